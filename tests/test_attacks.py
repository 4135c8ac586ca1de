"""The attack family: one contract every attack passes, chains, the registry, config errors.

Per-attack numbers are in test_attack_data.py and test_attack_updates.py.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_poison import attacks
from fedjax_poison.config import configuration

K, N, C, D = 3, 6, 4, 10  # clients, examples each, classes, parameters
IMAGE = (8, 8, 1)
HEAD = np.arange(8, dtype=np.int32).reshape(2, C)  # [F=2, C]: the first 8 of D parameters


def make(name: str, **fields) -> attacks.Attack:
    """The attack `name` with its default parameters, except `fields` ('block.field': v)."""
    cfg = attacks.default_config("2:0")
    for key, value in fields.items():
        block, field = key.split(".")
        cfg[block][field] = value
    sizes = dict(
        num_classes=C, image_shape=IMAGE, clients_per_round=K, head_index=HEAD, num_params=D
    )
    return attacks.make_attack(name, cfg, **sizes)


def round_inputs(poisoned=(True, False, True), seed=0):
    """(x [K, N, 8, 8, 1] uint8, y [K, N], count [K], updates [K, D], ctx) of a round."""
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.integers(0, 200, (K, N, *IMAGE)), jnp.uint8)
    y = jnp.asarray(rng.integers(0, C, (K, N)), jnp.int32)
    count = jnp.asarray([6, 4, 5], jnp.int32)
    updates = jnp.asarray(rng.normal(size=(K, D)), jnp.float32)
    ctx = attacks.AttackContext(
        poisoned=jnp.asarray(poisoned),
        client_ids=jnp.asarray([4, 7, 9], jnp.int32),
        round=jnp.int32(3),
        key=jax.random.key(seed),
        flip=jnp.asarray(attacks.flip_table(((2, 0),), C)),
    )
    return x, y, count, updates, ctx


def apply(attack: attacks.Attack, inputs):
    x, y, count, updates, ctx = inputs
    return (*attack.poison_data(x, y, count, ctx), attack.poison_updates(updates, ctx))


def assert_same(got, want):
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


@pytest.mark.parametrize("name", sorted(attacks.ATTACKS))
def test_contract(name):
    attack = make(name)
    assert attack.measure in attacks.MEASURES
    inputs = round_inputs()
    x, y, count, updates, ctx = inputs
    out = apply(attack, inputs)
    for got, given in zip(out, (x, y, updates)):  # shapes and dtypes kept
        assert got.shape == given.shape and got.dtype == given.dtype
    honest = np.flatnonzero(~np.asarray(ctx.poisoned))
    for got, given in zip(out, (x, y, updates)):  # rows not poisoning: bit-identical
        np.testing.assert_array_equal(np.asarray(got)[honest], np.asarray(given)[honest])
    nobody = inputs[:4] + (ctx._replace(poisoned=jnp.zeros(K, bool)),)
    assert_same(apply(attack, nobody), (x, y, updates))  # nobody poisons: nothing changes
    jitted = jax.jit(lambda *a: apply(attack, a))(*inputs)
    for got, eager in zip(jitted, out):  # the same under jit (NaN where the attack sends NaN)
        np.testing.assert_allclose(np.asarray(got), np.asarray(eager), rtol=1e-6, atol=1e-6)


def test_select_switches_between_attacks_under_jit():
    # One compiled round serves every attack of a sweep: a traced index picks the branch.
    names = sorted(attacks.ATTACKS)
    family = [make(n) for n in names]
    inputs = round_inputs()

    @jax.jit
    def run(index, x, y, count, updates, ctx):
        return apply(attacks.select(family, index), (x, y, count, updates, ctx))

    for i in range(len(names)):
        got, want = run(jnp.int32(i), *inputs), apply(family[i], inputs)
        for g, w in zip(got, want):
            assert g.dtype == w.dtype
            np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-6, atol=1e-6)
    assert run._cache_size() == 1


def test_chain_applies_its_parts_in_order():
    # label_flip turns 2 into 0; the backdoor stamps a share and labels it 2 (its target).
    inputs = round_inputs(poisoned=(True, True, True))
    x, y, count, _, ctx = inputs
    flip_then_stamp = make("label_flip+backdoor", **{"backdoor.target": 2})
    stamp_then_flip = make("backdoor+label_flip", **{"backdoor.target": 2})
    _, y1 = flip_then_stamp.poison_data(x, y, count, ctx)
    _, y2 = stamp_then_flip.poison_data(x, y, count, ctx)
    assert (y1 == 2).sum() > 0 and (y2 == 2).sum() == 0  # the flip came last in y2
    # Updates: ipm replaces the poisoned rows, so a scale before it is lost, after it is not.
    updates = jnp.asarray([[1.0, 2.0, 3.0], [4.0, 6.0, 8.0], [2.0, 2.0, 2.0]])
    ctx = ctx._replace(poisoned=jnp.asarray([True, False, False]))
    honest_mean = np.array([3.0, 4.0, 5.0])
    ipm_then_scale = make("ipm+scale", **{"scale.factor": 2.0}).poison_updates(updates, ctx)
    scale_then_ipm = make("scale+ipm", **{"scale.factor": 2.0}).poison_updates(updates, ctx)
    np.testing.assert_allclose(ipm_then_scale[0], 2 * -0.5 * honest_mean)
    np.testing.assert_allclose(scale_then_ipm[0], -0.5 * honest_mean)


def test_chain_measure_and_trigger():
    boosted = make("backdoor+scale", **{"backdoor.target": 3})
    assert boosted.measure == "backdoor" and boosted.target == 3 and boosted.trigger is not None
    assert make("sign_flip+label_flip").measure == "flip"
    assert make("sign_flip+scale").measure == "untargeted"


def test_chain_parts_draw_their_own_randomness():
    # Two gaussian parts in a chain: the second replaces the first, with other draws.
    inputs = round_inputs()
    alone = make("gaussian").poison_updates(inputs[3], inputs[4])
    twice = make("gaussian+gaussian").poison_updates(inputs[3], inputs[4])
    assert not np.allclose(np.asarray(alone)[0], np.asarray(twice)[0])


def test_every_factor_argument_is_a_config_field_or_a_size():
    cfg = attacks.default_config()
    for name in attacks.ATTACKS:
        fields = attacks.block_defaults(name)
        assert dict(cfg.get(name, {})) == fields
        assert not set(fields) & set(attacks.SIZES)


@pytest.mark.parametrize(
    "field, value, words",
    [
        ("attack.scale.factor", -1.0, "attack.scale.factor must be a finite number > 0"),
        ("attack.sign_flip.factor", 0.0, "attack.sign_flip.factor must be"),
        ("attack.gaussian.std", -1.0, "attack.gaussian.std must be"),
        ("attack.alie.z", -2.0, "attack.alie.z must be >= 0, or -1"),
        ("attack.alie.knowledge", "all", "attack.alie.knowledge must be one of"),
        ("attack.ipm.epsilon", 0.0, "attack.ipm.epsilon must be"),
        ("attack.min_max.perturbation", "unit", "attack.min_max.perturbation must be"),
        ("attack.min_sum.iters", 0, "attack.min_sum.iters must be"),
        ("attack.min_max.gamma_init", -1.0, "attack.min_max.gamma_init must be"),
        ("attack.inf.value", "zero", "attack.inf.value must be one of"),
        ("attack.backdoor.size", 30, "attack.backdoor.size must be in [1, 26]"),
        ("attack.backdoor.share", 0.0, "attack.backdoor.share must be in (0, 1]"),
        ("attack.backdoor.parts", 5, "attack.backdoor.parts must be in [1, size=4]"),
        ("attack.label_flip.mapping", "pair", "attack.label_flip.mapping must be one of"),
        ("attack.label_flip.target", 10, "attack.label_flip.target must be in [0, 10)"),
        ("attack.adaptive_flip.row_blend", 2.0, "attack.adaptive_flip.row_blend must be"),
        ("attack.fang_krum.halvings", -1, "attack.fang_krum.halvings must be an integer"),
        ("attack.fang_krum.knowledge", "all", "attack.fang_krum.knowledge must be one of"),
        ("attack.fang_trim.b", 1.0, "attack.fang_trim.b must be a finite number > 1"),
        ("attack.blended.alpha", 0.0, "attack.blended.alpha must be in (0, 1]"),
        ("attack.blended.target", 10, "attack.blended.target must be in [0, 10)"),
    ],
)
def test_bad_values_stop_with_one_line_naming_the_field(field, value, words):
    c = configuration.paper_config("fashion_mnist")
    _, block, name = field.split(".")
    c.attack[block][name] = value
    c.attack.name = block  # the field is checked when its attack is built ...
    with pytest.raises(configuration.ConfigError, match=re.escape(words)) as e:
        configuration.validate(c)
    assert "\n" not in str(e.value)
    c.attack.name = "label_flip" if block != "label_flip" else "sign_flip"
    c.sweep.attack = ("none", block)  # ... also when it is one of a sweep's attacks
    with pytest.raises(configuration.ConfigError, match="sweep.attack"):
        configuration.validate(c)


def test_unknown_attack_names_the_closest():
    c = configuration.paper_config("fashion_mnist")
    c.attack.name = "sign_flp"
    with pytest.raises(configuration.ConfigError, match="did you mean 'sign_flip'"):
        configuration.validate(c)
    c.attack.name = "backdoor+scal"
    with pytest.raises(configuration.ConfigError, match="did you mean 'scale'"):
        configuration.validate(c)
    c.attack.name = "none+scale"
    with pytest.raises(configuration.ConfigError, match="'none' cannot be chained"):
        configuration.validate(c)


def test_parse_flips():
    assert attacks.parse_flips("6:0") == ((6, 0),)
    assert attacks.parse_flips("6:0, 1:3") == ((6, 0), (1, 3))
    assert attacks.parse_flips("") == ()
    with pytest.raises(ValueError, match="attack.flips"):
        attacks.parse_flips("6-0")


def test_draw_malicious_is_seeded_and_sized():
    a = attacks.draw_malicious(3, 50, 0.3)
    assert a.sum() == 15
    assert (a == attacks.draw_malicious(3, 50, 0.3)).all()
    assert (a != attacks.draw_malicious(4, 50, 0.3)).any()
    assert attacks.draw_malicious(0, 50, 0.0).sum() == 0
    assert attacks.draw_malicious(0, 50, 1.0).all()


def test_larger_fraction_keeps_the_smaller_ones_malicious():
    # The same seed draws nested sets, so a sweep over fractions adds attackers.
    small, large = attacks.draw_malicious(1, 50, 0.1), attacks.draw_malicious(1, 50, 0.4)
    assert (large[small]).all()


def test_poisoning_window():
    rounds = jnp.arange(12)
    on = attacks.poisoning_now(rounds, jnp.int32(2), jnp.int32(10), jnp.int32(3))
    assert np.flatnonzero(np.asarray(on)).tolist() == [2, 5, 8]


@pytest.mark.parametrize("name", ["backdoor+backdoor", "blended+backdoor", "blended+blended"])
def test_a_chain_holds_at_most_one_backdoor(name):
    """A run measures one trigger: two backdoors in a chain stop in one line."""
    with pytest.raises(attacks.AttackConfigError, match="at most one backdoor"):
        attacks.split_name(name)
