"""Pre-aggregators and chains ('nnm+krum'): what each stage passes on, how the verdict maps
back to the clients, what a chain needs of k, and chains inside `defenses.select`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_defenses import K, build, compiled, hand, make_view, permuted, random_view, run

from fedjax_poison import defenses


def bucket_mix(view, bucket_size=2):
    k = view.updates.shape[0]
    stage = defenses.PRE_AGGREGATORS["bucketing"](clients_per_round=k, bucket_size=bucket_size)
    out, mix, _ = compiled(stage.apply, view, ())(view, ())
    return out, np.asarray(mix)


def buckets(mix, ids):
    """The buckets as sets of client ids."""
    return sorted(sorted(int(ids[j]) for j in np.flatnonzero(row)) for row in mix if row.any())


def test_bucketing_averages_random_buckets_of_s():
    view = random_view(0)
    out, mix = bucket_mix(view)
    assert mix.shape == (5, K)
    np.testing.assert_array_equal((mix > 0).sum(0), np.ones(K))  # each client in one bucket
    np.testing.assert_allclose(mix[mix > 0], 0.5)  # two per bucket, averaged
    np.testing.assert_allclose(out.updates, mix @ np.asarray(view.updates), rtol=1e-6)
    ids = np.asarray(view.client_ids)
    # the same clients in the same buckets whatever their order; other buckets next round
    perm = np.random.default_rng(1).permutation(K)
    _, moved = bucket_mix(permuted(view, perm))
    assert buckets(moved, ids[perm]) == buckets(mix, ids)
    _, later = bucket_mix(view._replace(round=view.round + 1))
    assert buckets(later, ids) != buckets(mix, ids)


def test_bucketing_with_an_invalid_client_and_an_odd_count():
    rows = np.random.default_rng(0).normal(size=(K, 50))
    rows[3, 0] = np.nan
    out, mix = bucket_mix(make_view(rows), bucket_size=4)  # 9 valid: buckets of 4, 4, 1
    assert mix.shape == (3, K) and (mix[:, 3] == 0).all()
    np.testing.assert_array_equal(sorted((mix > 0).sum(1)), [1, 4, 4])
    np.testing.assert_array_equal(out.valid, [True] * 3)


def test_nnm_by_hand():
    # k=4, f=1: each row becomes the mean of its 3 nearest, itself included:
    # rows 0, 1, 2 -> mean(0, 1, 2) = 1; row 3 -> mean(10, 2, 1) = 13/3.
    verdict, _ = hand("nnm+fedavg", [[0], [1], [2], [10]], num_byzantine=1)
    np.testing.assert_allclose(verdict.delta, [(3 + 13 / 3) / 4], rtol=1e-6)
    # client weights = fedavg's 1/4 per row @ the rows' shares: client 0 is in rows 0-2,
    # clients 1 and 2 in all four, client 3 in its own row only
    np.testing.assert_allclose(verdict.weights, [1 / 4, 1 / 3, 1 / 3, 1 / 12], rtol=1e-6)
    verdict, _ = hand("nnm+median", [[0], [1], [2], [10]], num_byzantine=1)
    np.testing.assert_allclose(verdict.delta, [1], rtol=1e-6)


def test_clipping_then_mean_is_norm_clipping():
    view = random_view(
        2, np.random.default_rng(2).normal(size=(K, 50)) * np.arange(1, K + 1)[:, None]
    )
    ((chained, _),) = run("norm_clipping+fedavg", [view])
    ((alone, _),) = run("norm_clipping", [view])
    np.testing.assert_allclose(chained.delta, alone.delta, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(chained.weights, alone.weights, rtol=1e-6)


def test_bucketing_then_multi_krum_flags_the_outliers_bucket():
    rows = np.zeros((6, 1)) + np.arange(6)[:, None] * 0.01
    rows[4] = 100.0
    # f=0: 3 buckets of 2, multi-krum keeps 2 buckets; the outlier's bucket is dropped
    verdict, _ = hand("bucketing+multi_krum", rows, num_byzantine=0, m=2)
    assert verdict.flags[4] and verdict.flags.sum() == 2
    np.testing.assert_allclose(verdict.weights, np.where(verdict.flags, 0, 1 / 4), rtol=1e-6)
    kept = np.flatnonzero(~np.asarray(verdict.flags))
    np.testing.assert_allclose(verdict.delta, rows[kept].mean(0), rtol=1e-5)


def test_nnm_then_krum_reports_the_outlier_score_on_its_client():
    rows = np.random.default_rng(4).normal(size=(K, 50))
    rows[6] += 50.0
    ((verdict, _),) = run("nnm+krum", [random_view(4, rows)])
    assert verdict.weights[6] == 0 and np.argmax(verdict.scores) == 6


@pytest.mark.parametrize(
    "name, k, message",
    [
        ("krum+median", 10, "'krum' is an aggregator and can only come last"),
        ("bucketing", 10, "'bucketing' is a pre-aggregator and needs an aggregator after it"),
        ("bucketng+median", 10, "(did you mean 'bucketing'?)"),
        ("nnm+mediam", 10, "(did you mean 'median'?)"),
        ("bucketing+foolsgold", 10, "foolsgold keeps a memory per client"),
        ("bucketing+krum", 5, "krum needs k > 2f+2, k=3, got 1 (k: the rows after bucketing)"),
        ("norm_clipping+bucketing+bulyan", 10, "bulyan needs k >= 4f+3, k=5, got 1 (k: the rows"),
        ("nnm+krum", 4, "nnm averages the k-f nearest"),
    ],
)
def test_chains_are_validated(name, k, message):
    f = 1 if name != "nnm+krum" else 2
    cfg = defenses.default_config()
    cfg.name = name
    for part in name.split("+"):
        if part in cfg and "num_byzantine" in cfg[part]:
            cfg[part].num_byzantine = f
    with pytest.raises(ValueError) as error:
        defenses.validate(cfg, clients_per_round=k, num_clients=50, num_classes=10)
    assert message in str(error.value) and "defense." in str(error.value)


def test_pre_aggregators_check_their_own_arguments():
    with pytest.raises(ValueError, match="^bucket_size must be >= 1, got 0"):
        defenses.PRE_AGGREGATORS["bucketing"](clients_per_round=5, bucket_size=0)
    with pytest.raises(ValueError, match="^num_byzantine must be >= 0"):
        defenses.PRE_AGGREGATORS["nnm"](clients_per_round=5, num_byzantine=-1)


def test_block_mode_is_for_pca_alone():
    cfg = defenses.default_config()
    cfg.name, cfg.mode = "nnm+pca", "block"
    with pytest.raises(ValueError, match="needs defense.name='pca'"):
        defenses.validate(cfg, clients_per_round=10, num_clients=50, num_classes=10)


def test_select_switches_between_chains_and_new_rules():
    names = ["bucketing+median", "dnc", "norm_clipping+trimmed_mean"]
    rules = [build(n) for n in names]
    chosen = defenses.select(rules, jnp.int32(0))
    view = random_view(6)

    def apply_with(index):
        picked = defenses.select(rules, index)
        return picked.apply(view, picked.init())

    apply = compiled(apply_with, jnp.int32(0))
    for i, name in enumerate(names):
        got, _ = apply(jnp.int32(i))
        ((want, _),) = run(name, [view])
        np.testing.assert_allclose(got.delta, want.delta, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(got.flags, want.flags)
    assert chosen.flags_clients and not chosen.root_size


def test_chain_memory_carries_through_scan():
    defense = build("bucketing+centered_clipping", tau=1.0)
    views = jax.tree.map(lambda *xs: jnp.stack(xs), *[random_view(s) for s in range(3)])
    scan = lambda m, vs: jax.lax.scan(lambda m, v: defense.apply(v, m)[::-1], m, vs)
    memory, verdicts = compiled(scan, defense.init(), views)(defense.init(), views)
    assert verdicts.delta.shape == (3, 50)
    np.testing.assert_allclose(memory[1], verdicts.delta[-1])  # the center is the last aggregate
