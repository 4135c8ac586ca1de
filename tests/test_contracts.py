"""fedjax_poison.testing's contract checks, run over every built-in member: the checks a
user's own member is held to are the ones the package's members pass."""

import pytest

from fedjax_poison import attacks, data, defenses, models, testing
from fedjax_poison.data import partition

CHAINS = ["nnm+krum", "bucketing+median", "norm_clipping+trimmed_mean", "arc+median"]


@pytest.mark.parametrize("name", sorted(attacks.ATTACKS) + ["backdoor+scale"])
def test_every_attack_keeps_the_attack_contract(name):
    testing.check_attack(name)


@pytest.mark.parametrize("name", sorted(defenses.DEFENSES) + CHAINS)
def test_every_defense_keeps_the_defense_contract(name):
    fields = {"pca": {"window": 2}, "auror": {"find_rounds": 1000}}  # auror: finds at round 20
    testing.check_defense(name, **fields.get(name, {}))


# The largest models compile for 10 s or more on 2 cores: the full suite checks them.
@pytest.mark.parametrize(
    "name",
    [
        pytest.param(n, marks=pytest.mark.slow)
        if n in ("resnet18", "cifar10_cnn", "vgg11", "lenet5")
        else n
        for n in sorted(models.MODELS)
    ],
)
def test_every_model_keeps_the_model_contract(name):
    shape = models.input_shape(name) or (28, 28, 1)
    narrow = {"width": 0.125} if "width" in models.MODELS.block(name) else {}  # the same layers
    testing.check_model(name, image_shape=shape, **narrow)


@pytest.mark.parametrize("name", sorted(data.SPECS))
def test_every_dataset_keeps_the_dataset_contract(name):
    testing.check_dataset(name, source="synthetic")


@pytest.mark.parametrize("name", sorted(partition.PARTITIONS))
def test_every_partition_keeps_the_partition_contract(name):
    testing.check_partition(name)


def test_the_checks_catch_a_broken_member():
    """An attack that touches honest rows and a defense that weights an invalid row fail."""

    def leaky(*, factor: float = 2.0):
        """Scales every row, honest ones too."""
        return attacks.Attack(attacks.clean_data, lambda u, ctx: factor * u, "untargeted")

    def trusting(*, mode: str):
        """FedAvg over every row, valid or not."""
        import jax.numpy as jnp

        def apply(view, memory):
            k = view.updates.shape[0]
            weights = jnp.full((k,), 1.0 / k)
            delta = weights @ view.updates
            return defenses.Verdict(
                delta, weights, jnp.zeros(k, bool), jnp.zeros(k), jnp.zeros(k, bool)
            ), memory

        return defenses.Defense(lambda: (), apply, root_size=0, flags_clients=False)

    with testing.registrations_undone():
        attacks.register("leaky", leaky)
        defenses.register("trusting", trusting)
        with pytest.raises(AssertionError, match="honest client's row"):
            testing.check_attack("leaky")
        with pytest.raises(AssertionError, match="invalid row has no weight"):
            testing.check_defense("trusting")
