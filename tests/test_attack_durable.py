"""Neurotoxin, the edge-case backdoor and alternating minimization against float64 numpy
transcriptions of their definitions on random inputs; what the round tells attacks (the
previous global change, the rule in use) on three toy clients by hand."""

import csv
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_attacks import C, D, make, round_inputs

from fedjax_poison import attacks, defenses, testing
from fedjax_poison.attacks.neurotoxin import coordinate_mask
from fedjax_poison.config import configuration, experiments
from fedjax_poison.round import client, simulation

# ---- Neurotoxin (Zhang et al., ICML 2022) ----


def ref_neurotoxin(updates, poisoned, global_update, ratio):
    """The authors' grad_mask: keep the int(ratio * d) coordinates of smallest magnitude
    (here of the previous global change; round(), and a coordinate at 0 never dropped)."""
    d = len(global_update)
    order = np.argsort(-np.abs(global_update), kind="stable")  # largest first
    dropped = order[: d - round(ratio * d)]
    keep = np.ones(d, bool)
    keep[dropped[global_update[dropped] != 0]] = False
    return np.where(poisoned[:, None], updates * keep, updates)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("ratio", [0.5, 0.9, 1.0])
def test_neurotoxin_matches_its_reference(seed, ratio):
    rng = np.random.default_rng(seed)
    x, y, count, _, ctx = round_inputs(seed=seed)
    updates = rng.normal(size=(3, 40))
    change = rng.normal(size=40) * rng.uniform(0, 3, 40)
    ctx = ctx._replace(global_update=jnp.asarray(change, jnp.float32))
    attack = make("neurotoxin", **{"neurotoxin.ratio": ratio})
    sent = jax.jit(attack.poison_updates)(jnp.asarray(updates, jnp.float32), ctx)
    want = ref_neurotoxin(updates, np.asarray(ctx.poisoned), change, ratio)
    np.testing.assert_allclose(np.asarray(sent), want, rtol=1e-6, atol=1e-7)


def test_neurotoxin_drops_exactly_the_largest_coordinates_of_the_global_change():
    change = jnp.asarray([0.1, -5.0, 2.0, 0.0, -0.3, 4.0, 1.0, -2.0, 0.2, 0.05])
    keep = np.asarray(coordinate_mask(change, 0.7))  # d - round(7) = 3 dropped
    assert np.flatnonzero(~keep).tolist() == [1, 2, 5]  # |-5|, |4|, then 2.0 before -2.0
    assert np.asarray(coordinate_mask(jnp.zeros(10), 0.5)).all()  # no change: keep all
    assert np.asarray(coordinate_mask(change, 1.0)).all()


def test_neurotoxin_poisons_data_as_the_backdoor_and_evaluates_its_trigger():
    inputs = round_inputs()
    x, y, count, updates, ctx = inputs
    toxin = make("neurotoxin", **{"neurotoxin.target": 1, "neurotoxin.size": 2})
    plain = make("backdoor", **{"backdoor.target": 1, "backdoor.size": 2})
    for got, want in zip(toxin.poison_data(x, y, count, ctx), plain.poison_data(x, y, count, ctx)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    np.testing.assert_array_equal(toxin.trigger(x[0]), plain.trigger(x[0]))
    assert (toxin.measure, toxin.target) == ("backdoor", 1)
    # Before any change of the global model, the update goes out whole.
    first = ctx._replace(global_update=jnp.zeros(D))
    np.testing.assert_array_equal(toxin.poison_updates(updates, first), updates)


@pytest.mark.parametrize(
    "field, value, words",
    [
        ("ratio", 0.0, "attack.neurotoxin.ratio must be in (0, 1]"),
        ("target", 10, "attack.neurotoxin.target must be in [0, 10)"),
        ("size", 30, "attack.neurotoxin.size must be in [1, 26]"),
        ("share", float("nan"), "attack.neurotoxin.share must be"),
        ("ratio", float("inf"), "attack.neurotoxin.ratio must be"),
    ],
)
def test_neurotoxin_fields_stop_with_one_line(field, value, words):
    c = configuration.paper_config("fashion_mnist")
    c.attack.name = "neurotoxin"
    c.attack.neurotoxin[field] = value
    with pytest.raises(configuration.ConfigError, match=re.escape(words)) as e:
        configuration.validate(c)
    assert "\n" not in str(e.value)


def test_neurotoxin_counts_as_the_chains_one_backdoor():
    with pytest.raises(attacks.AttackConfigError, match="at most one backdoor"):
        attacks.split_name("neurotoxin+backdoor")
    attacks.split_name("neurotoxin+scale")


# ---- Edge-case backdoor (Wang et al., NeurIPS 2020) ----


def ref_edge_case(x, y, count, poisoned, flip, share):
    """Per poisoning client and source class: its examples of the class, farthest from
    their mean first (stable), the first round(share * n) labelled flip[class]."""
    y = y.copy()
    for i in np.flatnonzero(poisoned):
        for c in np.flatnonzero(flip != np.arange(len(flip))):
            idx = np.flatnonzero(y[i, : count[i]] == c)
            if not len(idx):
                continue
            pixels = x[i, idx].reshape(len(idx), -1).astype(np.float64)
            dist = ((pixels - pixels.mean(0)) ** 2).sum(1)
            tail = idx[np.argsort(-dist, kind="stable")[: round(share * len(idx))]]
            y[i, tail] = flip[c]
    return y


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("share", [0.3, 0.5, 1.0])
def test_edge_case_matches_its_reference(seed, share):
    rng = np.random.default_rng(seed)
    k, n = 4, 30
    x = rng.integers(0, 256, (k, n, 5, 5, 1)).astype(np.uint8)
    y = rng.integers(0, C, (k, n)).astype(np.int32)
    count = np.asarray([30, 17, 0, 24], np.int32)
    poisoned = np.asarray([True, True, True, False])
    flip = attacks.flip_table(((2, 0), (3, 1)), C)
    ctx = attacks.AttackContext(
        jnp.asarray(poisoned), jnp.arange(k), jnp.int32(0), jax.random.key(0), jnp.asarray(flip)
    )
    attack = make("edge_case", **{"edge_case.share": share})
    got_x, got_y = jax.jit(attack.poison_data)(jnp.asarray(x), jnp.asarray(y), count, ctx)
    np.testing.assert_array_equal(np.asarray(got_x), x)
    want = ref_edge_case(x, y, count, poisoned, np.asarray(flip), share)
    np.testing.assert_array_equal(np.asarray(got_y), want)
    assert (want != y).any()


def test_edge_case_takes_the_examples_farthest_from_their_class_mean():
    # Class 2 on one client: four images near 0 and one white one; share 0.2 -> the white.
    x = np.zeros((1, 6, 2, 2, 1), np.uint8)
    x[0, 3] = 255
    x[0, 1] = 10
    y = jnp.asarray([[2, 2, 1, 2, 2, 2]])
    ctx = round_inputs(poisoned=(True,))[4]._replace(client_ids=jnp.zeros(1, jnp.int32))
    attack = make("edge_case", **{"edge_case.share": 0.2})
    _, got = attack.poison_data(jnp.asarray(x), y, jnp.asarray([6]), ctx)
    assert np.asarray(got).tolist() == [[2, 2, 1, 0, 2, 2]]  # only the tail of class 2


def test_edge_case_and_alt_min_are_measured_on_the_flips():
    c = configuration.paper_config("fashion_mnist")
    for name in ("edge_case", "alt_min"):
        c.attack.name, c.attack.malicious_fraction, c.attack.flips = name, 0.2, ""
        with pytest.raises(configuration.ConfigError, match="attack.flips is empty"):
            experiments.expand(c)
        c.attack.flips = "6:0"
        assert [e.flips for e in experiments.expand(c)] == [((6, 0),)]
        assert make(name).measure == "flip"


# ---- Alternating minimization (Bhagoji et al., ICML 2019) ----


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("boost, rho", [(0.0, 1.0), (10.0, 0.0), (4.0, 3.0)])
def test_alt_min_matches_its_reference(seed, boost, rho):
    """Alternating exact steps on |v - (b + lam (u - b))|^2 and rho |v - b|^2 (gradient
    steps on their sum, float64) converge where the attack sends."""
    rng = np.random.default_rng(seed)
    _, _, _, _, ctx = round_inputs(seed=seed)
    updates = rng.normal(size=(3, 20))
    benign = rng.normal(size=20)
    ctx = ctx._replace(global_update=jnp.asarray(benign, jnp.float32))
    attack = make("alt_min", **{"alt_min.boost": boost, "alt_min.rho": rho})
    sent = np.asarray(jax.jit(attack.poison_updates)(jnp.asarray(updates, jnp.float32), ctx))
    lam = boost or 3 / 2  # k / attackers: clients 0 and 2 of 3
    for row in np.flatnonzero(np.asarray(ctx.poisoned)):
        goal, v = benign + lam * (updates[row] - benign), updates[row].copy()
        for _ in range(2000):
            v -= 0.2 * ((v - goal) + rho * (v - benign))
        np.testing.assert_allclose(sent[row], v, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(sent[1], updates[1].astype(np.float32))


def test_alt_min_flips_the_chosen_share_of_source_labels():
    x, y, count, _, ctx = round_inputs()
    _, flipped = make("alt_min").poison_data(x, y, count, ctx)  # share 1: every source label
    want = np.where(np.asarray(ctx.poisoned)[:, None], np.asarray(ctx.flip)[np.asarray(y)], y)
    np.testing.assert_array_equal(np.asarray(flipped), want)


# ---- What the round tells attacks, on three toy clients ----


def toy_round(attack, defense_name):
    """A round of 3 clients (client 0 malicious) whose local training adds the client's
    mean label to both parameters of a [1, 2] output kernel; its defense `defense_name`."""

    def local_train(params, batch_stats, x, y, count, lr, key):
        del x, lr, key
        mean = jnp.sum(jnp.where(jnp.arange(y.shape[0]) < count, y, 0)) / count
        moved = jax.tree.map(lambda p: p + mean, params)
        return client.ClientResult(moved, batch_stats, jnp.zeros(()))

    defense = testing.build_defense(defense_name, k=3, d=2, num_clients=3)
    settings = simulation.RoundSettings(3, 0.1, 1.0, 1, 0.0, False, max_count=2)
    head = np.arange(2, dtype=np.int32).reshape(1, 2)
    step = simulation.make_round_step(local_train, [defense], [attack], settings, head)
    params = {"head": {"kernel": jnp.zeros((1, 2))}}
    state = simulation.init_state(lambda key: (params, {}), defenses.select([defense], 0), 0, 3)
    labels = jnp.asarray([1, 1, 2, 2, 6, 6], jnp.int32)  # clients' means 1, 2, 6
    data = simulation.ClientData(
        jnp.zeros((6, 1, 1, 1), jnp.uint8), labels, jnp.asarray([0, 2, 4]), jnp.full(3, 2)
    )
    scenario = simulation.Scenario(
        seed=jnp.int32(0),
        malicious=jnp.asarray([True, False, False]),
        flip=jnp.arange(C, dtype=jnp.int32),
        schedule=jnp.int32(0),
        breakpoint=jnp.int32(0),
        alpha=jnp.ones(2),
        poison_window=jnp.asarray([0, 10, 1], jnp.int32),
        attack=jnp.int32(0),
        defense=jnp.int32(0),
    )
    return jax.jit(step), state, scenario, data


def probe(send):
    """An attack whose poisoning rows send send(updates, ctx) [d]."""
    return attacks.Attack(
        attacks.clean_data,
        lambda u, ctx: attacks.replace_rows(u, send(u, ctx), ctx.poisoned),
        "untargeted",
    )


def test_the_round_keeps_its_global_change_for_attacks():
    # The attacker sends the previous round's change: nothing in round 1 (honest 2 and 6:
    # FedAvg (0 + 2 + 6) / 3), then that change (8/3 + 2 + 6) / 3 in round 2.
    step, state, scenario, data = toy_round(probe(lambda u, ctx: ctx.global_update), "fedavg")
    state, _ = step(state, scenario, data)
    np.testing.assert_allclose(state.last_update, [8 / 3, 8 / 3], rtol=1e-6)
    before = state.params["head"]["kernel"]
    state, _ = step(state, scenario, data)
    want = (8 / 3 + 2 + 6) / 3
    np.testing.assert_allclose(state.last_update, [want] * 2, rtol=1e-6)
    np.testing.assert_allclose(state.params["head"]["kernel"] - before, [[want] * 2], rtol=1e-6)


def test_the_round_offers_attacks_its_own_rule():
    # Updates 1, 2, 6 under the median; the attacker sends what the rule makes of them (2)
    # plus 0.5: the median of 2.5, 2, 6 is 2.5 (had it seen FedAvg's 3: 3.5).
    step, state, scenario, data = toy_round(probe(lambda u, ctx: ctx.aggregate(u) + 0.5), "median")
    state, _ = step(state, scenario, data)
    np.testing.assert_allclose(state.last_update, [2.5, 2.5])


# ---- Every attack in one matrix run ----


@pytest.mark.slow  # one sweep over every attack: minutes on 2 cores
def test_every_attack_runs_in_the_matrix(tmp_path):
    from test_simulation import tiny_config

    from fedjax_poison import compare_defenses

    c = tiny_config(num_rounds=1, eval_every=1)
    c.attack.malicious_fraction = 0.25
    names = sorted(set(attacks.ATTACKS) - {"none"})
    compare_defenses.compare(c, str(tmp_path), names, ["fedavg"], [0])
    rows = {r["attack"]: r for r in csv.DictReader(open(tmp_path / "matrix.csv"))}
    assert set(rows) == {"none", *names}
    for name in names:
        assert np.isfinite(float(rows[name]["accuracy_mean"])), name
        assert rows[name]["measure"] == make(name).measure, name
