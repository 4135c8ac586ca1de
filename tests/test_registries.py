"""The registries' one convention: a member's block is its factory's keyword arguments, a bad
value is refused in one line naming the field, and a user's member joins from user code."""

import re

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import pytest

import fedjax_poison
from fedjax_poison import attacks, data, defenses, models, testing
from fedjax_poison.config import configuration, field_help
from fedjax_poison.data import custom, partition
from fedjax_poison.registry import Registry, RegistryError


@pytest.fixture(autouse=True)
def _undo_registrations():
    with testing.registrations_undone():
        yield


def rule(*, mode: str, clients_per_round: int, strength: float = 1.0) -> defenses.Defense:
    """A stand-in rule: FedAvg, refusing a strength below 0."""
    if strength < 0:
        raise ValueError(f"strength must be >= 0, got {strength}")
    return defenses.DEFENSES["fedavg"]()


def test_a_block_is_the_factorys_keyword_arguments_with_defaults():
    sizes = ("mode", "clients_per_round")
    registry = Registry("rule", "defense.name", "defense.{name}", sizes=sizes)
    registry.register("stand_in", rule)
    assert registry.block("stand_in") == {"strength": 1.0}
    with pytest.raises(RegistryError, match=r"^defense\.stand_in\.strength must be >= 0, got -1"):
        registry.build("stand_in", {"strength": -1.0}, mode="filter", clients_per_round=5)
    with pytest.raises(
        RegistryError,
        match=r"defense\.stand_in\.strenght is not a field .*"
        r"did you mean defense\.stand_in\.strength",
    ):
        registry.build("stand_in", {"strenght": 2.0}, mode="filter", clients_per_round=5)
    with pytest.raises(RegistryError, match="did you mean 'stand_in'"):
        registry.check_name("stand_ni")


@pytest.mark.parametrize(
    "factory, words",
    [
        (lambda *, k: None, "argument 'k' has no default and is not one of the sizes"),
        (lambda *, k=None: None, "the default of 'k' is None"),
        (lambda **kwargs: None, "cannot be a config field"),
    ],
)
def test_a_factory_whose_arguments_cannot_be_fields_is_refused(factory, words):
    with pytest.raises(RegistryError, match=re.escape(words)):
        Registry("attack", "attack.name", "attack.{name}").register("bad", factory)


def test_built_in_members_are_replaced_only_on_purpose():
    with pytest.raises(RegistryError, match="built in; pass replace=True"):
        fedjax_poison.register_attack("sign_flip", attacks.ATTACKS["scale"])
    with pytest.raises(RegistryError, match="identifier"):
        fedjax_poison.register_attack("my-attack", attacks.ATTACKS["scale"])
    with pytest.raises(RegistryError, match="field of the attack block"):
        fedjax_poison.register_attack("flips", attacks.ATTACKS["scale"])
    with pytest.raises(RegistryError, match="built in"):
        fedjax_poison.register_dataset("mnist", arrays=tiny_arrays())


def test_a_rule_and_a_pre_aggregator_of_one_name_share_one_block():
    def clipping(*, clients_per_round: int, clip_norm: float = 5.0):
        return defenses.PRE_AGGREGATORS["norm_clipping"](clients_per_round=clients_per_round)

    with pytest.raises(RegistryError, match="share the block defense.norm_clipping"):
        defenses.register("norm_clipping", clipping, pre_aggregator=True, replace=True)
    assert defenses.PRE_AGGREGATORS.block("norm_clipping") == {"clip_norm": 0.0}


class Linear(nn.Module):
    """A linear model on the flattened image, for the tests."""

    num_classes: int = 10
    scale: float = 1.0

    @nn.compact
    def __call__(self, x, train: bool = False, mask=None):
        return nn.Dense(self.num_classes, name=models.HEAD)(self.scale * x.reshape(len(x), -1))


def test_a_users_model_is_a_field_of_every_config_built_after_it():
    fedjax_poison.register_model("linear_test", Linear)
    c = configuration.paper_config("cifar10")
    assert c.model.linear_test.to_dict() == {"scale": 1.0}
    c.model.name = "linear_test"
    configuration.validate(c)  # any image shape: it flattens
    c.model.linear_test.scale = 2.0
    configuration.validate(c)


def test_a_model_that_does_not_give_c_logits_or_has_no_head_is_refused():
    class NoHead(nn.Module):
        num_classes: int = 10

        @nn.compact
        def __call__(self, x, train: bool = False, mask=None):
            return nn.Dense(self.num_classes)(x.reshape(len(x), -1))

    class Wrong(Linear):
        @nn.compact
        def __call__(self, x, train: bool = False, mask=None):
            return nn.Dense(3, name=models.HEAD)(x.reshape(len(x), -1))

    for name, module, words in [
        ("no_head_test", NoHead, "must name its output layer 'head'"),
        ("wrong_test", Wrong, "must give 10 logits per image"),
    ]:
        fedjax_poison.register_model(name, module)
        c = configuration.paper_config("fashion_mnist")
        c.model.name = name
        with pytest.raises(configuration.ConfigError, match=words):
            configuration.validate(c)


def tiny_arrays(m=60, shape=(6, 6, 1), classes=3, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (m, *shape), dtype=np.uint8)
    return x, np.arange(m) % classes, x[: m // 2], np.arange(m // 2) % classes


def test_a_dataset_from_arrays_runs_with_the_models_that_take_any_shape():
    spec = fedjax_poison.register_dataset(
        "tiny_test", arrays=tiny_arrays(), recipe={"model": {"name": "mlp"}}
    )
    assert (spec.image_shape, spec.num_classes) == ((6, 6, 1), 3)
    loaded = data.load_dataset("tiny_test")
    assert loaded.source == "files" and loaded.x_train.shape == (60, 6, 6, 1)
    c = configuration.paper_config("tiny_test")
    c.num_clients, c.clients_per_round, c.batch_size = 4, 2, 4
    configuration.validate(c)
    c.model.name = "fashion_mnist_cnn"  # built for 28 x 28 x 1 only
    with pytest.raises(configuration.ConfigError, match="must take tiny_test's 6x6x1 images"):
        configuration.validate(c)


@pytest.mark.parametrize(
    "arrays, words",
    [
        (
            (
                np.zeros((4, 6, 6), np.float32),
                np.zeros(4),
                np.zeros((2, 6, 6), np.uint8),
                np.zeros(2),
            ),
            "x_train must be uint8 images",
        ),
        (
            (
                np.zeros((4, 6, 6), np.uint8),
                np.zeros(3),
                np.zeros((2, 6, 6), np.uint8),
                np.zeros(2),
            ),
            "y_train must be 4 integer labels",
        ),
        (
            (
                np.zeros((4, 6, 6), np.uint8),
                -np.ones(4, int),
                np.zeros((2, 6, 6), np.uint8),
                np.zeros(2, int),
            ),
            "labels must lie in",
        ),
        (
            (
                np.zeros((0, 6, 6), np.uint8),
                np.zeros(0, int),
                np.zeros((2, 6, 6), np.uint8),
                np.zeros(2, int),
            ),
            "M >= 1",
        ),
        (
            (
                np.zeros((4, 6, 6), np.uint8),
                np.zeros(4, int),
                np.zeros((2, 5, 5), np.uint8),
                np.zeros(2, int),
            ),
            "differ in shape",
        ),
    ],
)
def test_bad_arrays_are_refused_in_one_line(arrays, words):
    with pytest.raises(data.DataError, match=words) as info:
        fedjax_poison.register_dataset("bad_test", arrays=arrays)
    assert "\n" not in str(info.value)


def test_a_loader_is_read_when_the_run_loads_its_data():
    calls = []

    def load():
        calls.append(1)
        return tiny_arrays(classes=4)

    fedjax_poison.register_dataset("loaded_test", load=load, image_shape=(6, 6, 1), num_classes=4)
    assert not calls  # registering reads nothing
    assert data.load_dataset("loaded_test").y_test.max() == 3 and calls == [1]
    with pytest.raises(data.DataError, match="no tfds source"):
        data.load_dataset("loaded_test", source="tfds")


def test_a_users_partition_has_its_block_and_is_checked():
    def halves(*, labels, num_clients, rng, skew: float = 0.5):
        """Every client gets a contiguous slice (for the test)."""
        size = len(labels) // num_clients
        return np.arange(size * num_clients).reshape(num_clients, size), np.full(num_clients, size)

    fedjax_poison.register_partition("slices_test", halves)
    c = configuration.paper_config("fashion_mnist")
    assert c.data.slices_test.skew == 0.5
    c.data.partition = "slices_test"
    configuration.validate(c)
    with pytest.raises(RegistryError, match="is a field of the data block"):
        fedjax_poison.register_partition("source", halves)

    def broken(*, labels, num_clients, rng):
        return -np.ones((num_clients, 2), int), np.full(num_clients, 2)

    fedjax_poison.register_partition("broken_test", broken)
    with pytest.raises(data.DataError, match="index outside"):
        partition.split("broken_test", {}, np.zeros(10), num_clients=2, rng=None)


def test_every_field_outside_the_blocks_has_a_line_of_meaning():
    from fedjax_poison.list import flatten

    c = configuration.paper_config("fashion_mnist").to_dict()
    blocks = {
        f"{s}.{m}."
        for s, members in (
            ("attack", attacks.ATTACKS),
            ("defense", defenses.DEFENSES),
            ("defense", defenses.PRE_AGGREGATORS),
            ("model", models.MODELS),
            ("data", partition.PARTITIONS),
        )
        for m in members
    }
    fields = [f for f, _ in flatten(c) if not any(f.startswith(b) for b in blocks)]
    missing = [f for f in fields if field_help.help_for(f) is None]
    assert not missing
    assert set(field_help.FIELD_HELP) <= set(fields), "help for a field that does not exist"


def test_list_names_every_member_with_its_block(capsys):
    from fedjax_poison import list as list_command

    assert list_command.main(["defenses"]) == 0
    out = capsys.readouterr().out
    assert "defense.krum.num_byzantine=1" in out and "bucketing" in out
    for name in defenses.DEFENSES:
        assert f"  {name}: " in out
    assert list_command.main(["models"]) == 0
    out = capsys.readouterr().out
    assert "resnet18 [any image shape]" in out and "model.resnet18.norm='group'" in out
    assert list_command.main(["fields", "--config=configs/cifar.py"]) == 0
    assert "batch_size = 10" in capsys.readouterr().out  # the CIFAR-10 recipe's
    assert list_command.main(["fields", "--config=nowhere.py"]) == 2


def test_custom_datasets_default_recipe_names_registered_models():
    assert custom.DEFAULT_RECIPE["model"]["name"] in models.MODELS
    spec = custom.from_arrays("x", *tiny_arrays())
    assert jnp.isfinite(data.normalize(tiny_arrays()[0], spec)).all()
