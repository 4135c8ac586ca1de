"""Verdicts that do not depend on the clients' order, compiled as a run compiles them
(plain `jax.jit`, every optimisation on), and rules that build or refuse at k = 1 and 2."""

import jax
import numpy as np
import pytest

from fedjax_poison import defenses
from fedjax_poison.testing import make_view, permuted

K11, D = 11, 50


def build(name, k=K11, d=D, **overrides):
    cfg = defenses.block_for(name, **overrides)
    return defenses.make_defense(
        cfg, num_clients=20, clients_per_round=k, num_params=d, num_classes=3, head_features=4
    )


def jitted(name, k=K11, d=D, **overrides):
    defense = build(name, k=k, d=d, **overrides)
    return defense, jax.jit(defense.apply)


@pytest.mark.parametrize("d", [50, 100])
def test_identical_rows_share_krums_pick_equally(d):
    defense, apply = jitted("krum", d=d)
    for seed in range(3):  # today's rows on which a float projection split the tie
        rows = np.tile(np.random.default_rng(seed).normal(size=(1, d)), (K11, 1))
        verdict, _ = apply(make_view(rows), defense.init())
        np.testing.assert_allclose(verdict.weights, np.full(K11, 1 / K11), rtol=1e-6)


CHOOSERS = ["krum", "multi_krum", "bulyan", "nnm+multi_krum", "mda", "smea", "monna", "caf"]


@pytest.mark.parametrize("name", CHOOSERS + ["arc+multi_krum"])
def test_permuting_the_clients_permutes_the_verdict(name):
    defense, apply = jitted(name)
    for rows in range(2):  # rows 0: NNM's mixed rows tie, and a float projection split them
        view = make_view(np.random.default_rng(rows).normal(size=(K11, D)))
        want, _ = jax.device_get(apply(view, defense.init()))
        for seed in range(20):
            perm = np.random.default_rng(seed).permutation(K11)
            got, _ = jax.device_get(apply(permuted(view, perm), defense.init()))
            message = f"rows {rows}, permutation {seed}"
            np.testing.assert_array_equal(got.flags, want.flags[perm], err_msg=message)
            np.testing.assert_allclose(got.weights, want.weights[perm], atol=1e-7)
            np.testing.assert_allclose(got.delta, want.delta, rtol=1e-5, atol=1e-6)


RULES = sorted(defenses.DEFENSES) + [
    "nnm+krum",
    "bucketing+median",
    "norm_clipping+trimmed_mean",
    "norm_clipping+bucketing+median",
    "arc+median",
]


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("name", RULES)
def test_every_rule_builds_or_is_refused_at_few_clients(name, k):
    """Building either raises a one-line ValueError or gives a rule whose jitted apply on
    finite rows returns a finite verdict."""
    try:
        defense = build(name, k=k, d=12)
    except ValueError as error:
        assert "\n" not in str(error) and str(error)
        return
    rows = np.random.default_rng(k).normal(size=(k, 12))
    verdict, _ = jax.jit(defense.apply)(make_view(rows), defense.init())
    assert np.isfinite(verdict.delta).all() and np.isfinite(verdict.weights).all()
    assert not np.isnan(verdict.scores).any()
