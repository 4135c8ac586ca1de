"""Update attacks by hand (k = 3 clients, d = 3), and the colluding ones against float64
numpy transcriptions of their papers' definitions, written for gradients as the papers
write them (a gradient is about -update) and compared on random inputs."""

import statistics

import jax.numpy as jnp
import numpy as np
import pytest
from test_attacks import make, round_inputs

from fedjax_poison.attacks.collusion import alie_z

UPDATES = jnp.asarray([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])


def send(name, poisoned=(True, False, False), updates=UPDATES, **fields):
    ctx = round_inputs()[4]._replace(poisoned=jnp.asarray(poisoned))
    return np.asarray(make(name, **fields).poison_updates(updates, ctx))


def test_sign_flip_and_scale():
    assert send("sign_flip", **{"sign_flip.factor": 2.0})[0].tolist() == [-2, -4, -6]
    assert send("scale")[0].tolist() == [10, 20, 30]  # factor 10 by default


def test_model_replacement_makes_fedavg_the_attackers_mean():
    # factor 0: gamma = k / f = 3 / 2; FedAvg then gives the attackers' mean [4, 5, 6]
    # plus a third of the honest update [4, 5, 6].
    sent = send("scale", poisoned=(True, False, True), **{"scale.factor": 0.0})
    np.testing.assert_allclose(sent[[0, 2]], 1.5 * np.asarray(UPDATES)[[0, 2]])
    np.testing.assert_allclose(sent.mean(0), [4 + 4 / 3, 5 + 5 / 3, 6 + 6 / 3], rtol=1e-6)


def test_gaussian_noise():
    assert send("gaussian", **{"gaussian.mean": 3.0, "gaussian.std": 0.0})[0].tolist() == [3] * 3
    wide = jnp.zeros((2, 20000))
    noise = send("gaussian", (True, True), wide, **{"gaussian.std": 2.0})
    assert abs(noise.std() - 2.0) < 0.05 and abs(noise.mean()) < 0.05
    assert not np.allclose(noise[0], noise[1])  # each client its own draw


@pytest.mark.parametrize("value, want", [("inf", np.inf), ("-inf", -np.inf), ("huge", 1e20)])
def test_inf_values(value, want):
    sent = send("inf", **{"inf.value": value})
    assert (sent[0] == np.float32(want)).all()
    assert np.isnan(send("inf")[0]).all()  # 'nan' by default


def test_ipm_by_hand():
    # Honest mean [5.5, 6.5, 7.5]; epsilon 0.5.
    assert send("ipm")[0].tolist() == [-2.75, -3.25, -3.75]
    # 'own': the attackers' own mean, rows 0 and 1: [2.5, 3.5, 4.5].
    own = send("ipm", (True, True, False), **{"ipm.knowledge": "own"})
    assert own[0].tolist() == own[1].tolist() == [-1.25, -1.75, -2.25]


def test_alie_z_max_by_hand():
    # s = floor(n/2 + 1) - m, z = Phi^-1((n - s) / n).
    assert float(alie_z(3, 1)) == pytest.approx(0.4307, abs=1e-4)  # s = 1, Phi^-1(2/3)
    assert float(alie_z(5, 2)) == pytest.approx(0.8416, abs=1e-4)  # s = 1, Phi^-1(4/5)
    assert float(alie_z(50, 10)) == pytest.approx(0.4677, abs=1e-4)  # s = 16, Phi^-1(0.68)


def test_alie_by_hand():
    # Honest rows [4, 5, 6], [7, 8, 9]: mean [5.5, 6.5, 7.5], std (n - 1) 3 / sqrt(2).
    sent = send("alie", **{"alie.z": 1.0})
    np.testing.assert_allclose(sent[0], [5.5 - 2.1213, 6.5 - 2.1213, 7.5 - 2.1213], atol=1e-4)
    z_max = send("alie")  # k = 3, m = 1: z = 0.4307
    np.testing.assert_allclose(z_max[0], np.array([5.5, 6.5, 7.5]) - 0.4307 * 2.1213, atol=1e-3)


# Honest updates [0,0,0], [2,0,0], [4,0,0] (mean [2,0,0]); row 3 poisons; 'unit_vec' moves
# the mean along -[1,0,0]: crafted [2 - g, 0, 0], squared distances (2-g)^2, g^2, (2+g)^2.
LINE = jnp.asarray([[0.0, 0, 0], [2, 0, 0], [4, 0, 0], [9, 9, 9]])
ON_LINE = dict(poisoned=(False, False, False, True), updates=LINE)


def test_min_max_by_hand():
    # Largest honest pair distance 16: (2 + g)^2 <= 16 -> g = 2, crafted [0, 0, 0].
    sent = send("min_max", **ON_LINE, **{"min_max.perturbation": "unit_vec"})
    np.testing.assert_allclose(sent[3], [0, 0, 0], atol=1e-4)


def test_min_sum_by_hand():
    # Sum 8 + 3 g^2 against the smallest honest sum, 8 (of [2,0,0]): g = 0, the mean itself.
    # (In float32, 8 + 3 g^2 rounds to 8 up to g = 5e-4.)
    sent = send("min_sum", **ON_LINE, **{"min_sum.perturbation": "unit_vec"})
    np.testing.assert_allclose(sent[3], [2, 0, 0], atol=1e-3)


def test_std_perturbation_raises_every_coordinate_of_an_update():
    # The paper's -std of gradients is +std of updates: crafted = mean + g * std.
    rows = jnp.asarray([[0.0, 0, 1], [2, 4, 1], [9, 9, 9]])
    sent = send("min_max", (False, False, True), rows)
    assert (sent[2, :2] > [1, 2]).all() and sent[2, 2] == 1  # std of the last coordinate: 0


# ---- float64 references, in gradients g = -update, as the papers' code writes them ----


def ref_lie(g, known, m):
    """Baruch et al.'s z_max; Shejwalkar & Houmansadr's lie_attack: mean + z * std."""
    n = len(g)  # the round's clients
    s = np.floor(n / 2 + 1) - m
    z = statistics.NormalDist().inv_cdf((n - s) / n)
    return g[known].mean(0) + z * g[known].std(0, ddof=1)


def ref_ipm(g, known, epsilon=0.5):
    return -epsilon * g[known].mean(0)


def ref_min_max_or_sum(g, known, dev_type, rule):
    """Shejwalkar & Houmansadr's our_attack_dist (min_max) / our_attack_score (min_sum)."""
    all_updates = g[known]
    model_re = all_updates.mean(0)
    deviation = {
        "unit_vec": model_re / np.linalg.norm(model_re),
        "sign": np.sign(model_re),
        "std": all_updates.std(0, ddof=1),
    }[dev_type]
    lamda, threshold_diff, lamda_succ = 10.0, 1e-5, 0.0
    lamda_fail = lamda
    distances = np.array([np.linalg.norm(all_updates - u, axis=1) ** 2 for u in all_updates])
    bound = distances.max() if rule == "min_max" else distances.sum(1).min()
    while abs(lamda_succ - lamda) > threshold_diff:
        mal_update = model_re - lamda * deviation
        distance = np.linalg.norm(all_updates - mal_update, axis=1) ** 2
        if (distance.max() if rule == "min_max" else distance.sum()) <= bound:
            lamda_succ = lamda
            lamda = lamda + lamda_fail / 2
        else:
            lamda = lamda - lamda_fail / 2
        lamda_fail = lamda_fail / 2
    return model_re - lamda_succ * deviation


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("knowledge", ["honest", "own"])
def test_colluding_attacks_match_their_references(seed, knowledge):
    rng = np.random.default_rng(seed)
    k, d = 7, 40
    poisoned = np.zeros(k, bool)
    poisoned[rng.choice(k, 3, replace=False)] = True
    updates = rng.normal(0.1, 1.0, (k, d)) * rng.uniform(0.5, 2.0, d)  # float64
    known = ~poisoned if knowledge == "honest" else poisoned
    g = -updates  # what the papers' code reads
    m = int(poisoned.sum())
    cases = {"alie": ref_lie(g, known, m), "ipm": ref_ipm(g, known)}
    for kind in ("unit_vec", "sign", "std"):
        for rule in ("min_max", "min_sum"):
            cases[f"{rule}:{kind}"] = ref_min_max_or_sum(g, known, kind, rule)
    for case, want in cases.items():
        name, _, kind = case.partition(":")
        fields = {f"{name}.knowledge": knowledge}
        fields.update({f"{name}.perturbation": kind} if kind else {})
        sent = send(name, poisoned, jnp.asarray(updates, jnp.float32), **fields)
        for row in np.flatnonzero(poisoned):
            np.testing.assert_allclose(sent[row], -want, rtol=1e-4, atol=2e-4, err_msg=case)
        np.testing.assert_array_equal(sent[~poisoned], updates[~poisoned].astype(np.float32))


# ---- Fang et al. (USENIX Security 2020) and Mimic (Karimireddy et al., ICLR 2022) ----


def ref_krum_scores(x, f):
    d2 = ((x[:, None] - x[None]) ** 2).sum(-1)
    n = len(x)
    return np.array([np.sort(np.delete(d2[i], i))[: max(n - f - 2, 1)].sum() for i in range(n)])


def ref_fang_krum(updates, known, c, halvings=20):
    """Fang et al.'s full/partial-knowledge attack on Krum, in updates (w_Re = w_global):
    lambda_0 from the paper's bound, halved until Krum with f = c picks -lambda s among the
    known updates and c copies of it."""
    x = updates[known]
    n, d = x.shape
    s = np.sign(x.mean(0))
    dist = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
    near = min(np.sort(np.delete(dist[i], i))[: n - 2].sum() for i in range(n))
    first = near / (n - c - 1) if n - c - 1 > 0 and n > 2 else 0.0
    lam = (first + np.linalg.norm(x, axis=1).max()) / np.sqrt(d)
    for _ in range(halvings + 1):
        rows = np.concatenate([x, np.tile(-lam * s, (c, 1))])
        scores = ref_krum_scores(rows, c)
        if scores[n:].min() <= scores[:n].min():
            return -lam * s
        lam /= 2
    return -2 * lam * s


def random_round(seed, k=10, d=40, attackers=3):
    rng = np.random.default_rng(seed)
    poisoned = np.zeros(k, bool)
    poisoned[rng.choice(k, attackers, replace=False)] = True
    updates = rng.normal(0.1, 1.0, (k, d)) * rng.uniform(0.5, 2.0, d)
    return poisoned, updates


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("knowledge", ["honest", "own"])
def test_fang_krum_matches_fang_et_al(seed, knowledge):
    poisoned, updates = random_round(seed)
    known = ~poisoned if knowledge == "honest" else poisoned
    want = ref_fang_krum(updates, known, int(poisoned.sum()))
    sent = send(
        "fang_krum",
        poisoned,
        jnp.asarray(updates, jnp.float32),
        **{"fang_krum.knowledge": knowledge},
    )
    for row in np.flatnonzero(poisoned):
        np.testing.assert_allclose(sent[row], want, rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(sent[~poisoned], updates[~poisoned].astype(np.float32))


@pytest.mark.slow  # the quick tier leaves launches and large compiles out
def test_fang_krum_is_what_krum_picks():
    """With full knowledge the crafted update is the one Krum (f = the attackers) picks."""
    from fedjax_poison.testing import build_defense, make_view

    poisoned, updates = random_round(5)
    sent = send("fang_krum", poisoned, jnp.asarray(updates, jnp.float32))
    krum = build_defense("krum", d=40, num_byzantine=int(poisoned.sum()))
    verdict, _ = krum.apply(make_view(sent), krum.init())
    assert np.asarray(verdict.weights)[poisoned].sum() == pytest.approx(1.0)


@pytest.mark.parametrize("knowledge", ["honest", "own"])
def test_fang_trim_draws_in_the_papers_ranges(knowledge):
    """Per coordinate, beyond the known maximum where the known mean is negative (up to
    b = 2 times it), below the minimum elsewhere; 'own': mu +- [3, 4] sigma."""
    poisoned, updates = random_round(7, d=2000)
    known = ~poisoned if knowledge == "honest" else poisoned
    x = updates[known]
    sent = send(
        "fang_trim",
        poisoned,
        jnp.asarray(updates, jnp.float32),
        **{"fang_trim.knowledge": knowledge},
    ).astype(np.float64)
    up = x.mean(0) < 0
    top, low = x.max(0), x.min(0)
    if knowledge == "honest":
        lo = np.where(up, top, np.where(low > 0, low / 2, 2 * low))
        hi = np.where(up, np.where(top > 0, 2 * top, top / 2), low)
    else:
        mu, sigma = x.mean(0), x.std(0, ddof=1)
        lo = np.where(up, mu + 3 * sigma, mu - 4 * sigma)
        hi = np.where(up, mu + 4 * sigma, mu - 3 * sigma)
    crafted = sent[poisoned]
    assert (crafted >= lo - 1e-4).all() and (crafted <= hi + 1e-4).all()
    u = (crafted - lo) / (hi - lo)
    assert abs(u.mean() - 0.5) < 0.02  # uniform within the range
    assert not np.allclose(crafted[0], crafted[1])  # each client its own draw


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mimic_copies_the_honest_client_along_the_top_direction(seed):
    poisoned, updates = random_round(seed)
    honest = updates[~poisoned]
    z = honest - honest.mean(0)
    v = np.linalg.svd(z, full_matrices=False)[2][0]  # top principal direction
    chosen = honest[np.argmax(np.abs(z @ v))]
    sent = send("mimic", poisoned, jnp.asarray(updates, jnp.float32))
    for row in np.flatnonzero(poisoned):
        np.testing.assert_array_equal(sent[row], chosen.astype(np.float32))
    np.testing.assert_array_equal(sent[~poisoned], honest.astype(np.float32))
