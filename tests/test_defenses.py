"""Every defense: one contract test over the registry, then numbers checked by hand."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_poison import defenses

K, D, C, F = 10, 50, 3, 4
NAMES = sorted(defenses.DEFENSES)


def build(name, *, k=K, d=D, num_classes=C, head_features=F, num_clients=20, **overrides):
    cfg = defenses.default_config()
    cfg.name = name
    cfg.update(overrides)
    return defenses.make_defense(
        cfg,
        num_clients=num_clients,
        clients_per_round=k,
        num_params=d,
        num_classes=num_classes,
        head_features=head_features,
    )


def make_view(updates, head_rows=None, *, ids=None, round_=20, root=None, global_head=None):
    updates = jnp.asarray(updates, jnp.float32)
    k, d = updates.shape
    if head_rows is None:
        head_rows = jnp.reshape(jnp.arange(k * C * F, dtype=jnp.float32) % 7, (k, C, F))
    head_rows = jnp.asarray(head_rows, jnp.float32)
    return defenses.RoundView(
        updates=updates,
        head_rows=head_rows,
        global_head=jnp.ones(head_rows.shape[1:]) if global_head is None else global_head,
        client_ids=jnp.arange(k, dtype=jnp.int32) if ids is None else jnp.asarray(ids, jnp.int32),
        round=jnp.int32(round_),
        root_update=jnp.zeros(d) if root is None else jnp.asarray(root, jnp.float32),
        valid=jnp.ones((k,), bool),
    )


def random_view(seed, outlier=False):
    rng = np.random.default_rng(seed)
    updates = rng.normal(size=(K, D))
    if outlier:
        updates[3] *= 100.0
    return make_view(
        updates,
        rng.normal(size=(K, C, F)),
        ids=rng.permutation(20)[:K],
        root=rng.normal(size=D),
        global_head=jnp.asarray(rng.normal(size=(C, F)), jnp.float32),
    )


def apply_once(defense, view, memory=None):
    memory = defense.init() if memory is None else memory
    return jax.jit(defense.apply)(view, memory)


def permuted(view, perm):
    return view._replace(
        updates=view.updates[perm], head_rows=view.head_rows[perm], client_ids=view.client_ids[perm]
    )


def shapes(tree):
    return jax.tree.map(lambda x: (jnp.shape(x), jnp.result_type(x)), tree)


# Settings under which a rule must give the plain mean on random updates.
AS_FEDAVG = {
    "fedavg": {},
    "trimmed_mean": {"trim": 0},
    "norm_clipping": {"clip_norm": 1e9},
    "centered_clipping": {"cc_tau": 1e9},
    "multi_krum": {"multi_krum_m": K},
    "bulyan": {"num_byzantine": 0},
    "pca": {"start_round": 1000},
}


@pytest.mark.parametrize("name", NAMES)
def test_contract(name):
    defense = build(name)
    memory = defense.init()
    for outlier in (False, True):
        view = random_view(0, outlier)
        verdict, new_memory = apply_once(defense, view, memory)
        assert verdict.delta.shape == (D,) and bool(jnp.isfinite(verdict.delta).all())
        assert verdict.weights.shape == (K,) and verdict.weights.dtype == jnp.float32
        assert bool((verdict.weights >= 0).all())
        np.testing.assert_allclose(verdict.weights.sum(), 1.0, rtol=1e-5)
        assert verdict.flags.shape == (K,) and verdict.flags.dtype == jnp.bool_
        assert verdict.scores.shape == (K,) and verdict.scores.dtype == jnp.float32
        assert verdict.block.shape == (K,) and verdict.block.dtype == jnp.bool_
        assert shapes(new_memory) == shapes(memory)
        if not defense.flags_clients:
            assert not verdict.flags.any()

    # client order does not matter (ids travel with their rows)
    view = random_view(1)
    perm = np.random.default_rng(2).permutation(K)
    verdict, _ = apply_once(defense, view)
    moved, _ = apply_once(defense, permuted(view, perm))
    np.testing.assert_allclose(moved.delta, verdict.delta, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(moved.weights, verdict.weights[perm], rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(moved.flags, verdict.flags[perm])

    # memory carries through lax.scan over rounds
    views = jax.tree.map(lambda *xs: jnp.stack(xs), *[random_view(s) for s in range(3)])
    memory, verdicts = jax.lax.scan(lambda m, v: defense.apply(v, m)[::-1], defense.init(), views)
    assert verdicts.delta.shape == (3, D) and shapes(memory) == shapes(defense.init())


@pytest.mark.parametrize("name", NAMES)
def test_equals_fedavg_where_it_must(name):
    view = random_view(3)
    mean = view.updates.mean(axis=0)
    if name in AS_FEDAVG:
        verdict, _ = apply_once(build(name, **AS_FEDAVG[name]), view)
        np.testing.assert_allclose(verdict.delta, mean, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(verdict.weights, jnp.full(K, 1 / K), rtol=1e-5)
    defense = build(name, mode="detect")
    if defense.flags_clients:  # detect mode reports flags and aggregates with FedAvg
        verdict, _ = apply_once(defense, view)
        np.testing.assert_allclose(verdict.delta, mean, rtol=1e-5, atol=1e-6)
    # identical updates: every rule returns that update
    same = make_view(jnp.tile(view.updates[:1], (K, 1)), root=view.updates[0])
    verdict, _ = apply_once(build(name), same)
    np.testing.assert_allclose(verdict.delta, view.updates[0], rtol=1e-4, atol=1e-5)


def test_only_fltrust_needs_root_and_which_rules_flag():
    assert [n for n in NAMES if build(n).needs_root] == ["fltrust"]
    flagging = {n for n in NAMES if build(n).flags_clients}
    assert flagging == {"pca", "multi_krum", "bulyan", "foolsgold", "fltrust", "lfighter"}


def hand(name, updates, memory=None, **kwargs):
    """Apply `name` to a small hand-made round (k and d taken from `updates`)."""
    updates = np.asarray(updates, np.float32)
    k, d = updates.shape
    view_args = {key: kwargs.pop(key) for key in ("head_rows", "root") if key in kwargs}
    defense = build(name, k=k, d=d, num_clients=max(k, 3), **kwargs)
    return apply_once(defense, make_view(updates, **view_args), memory)


def test_fedavg_by_hand():
    verdict, _ = hand("fedavg", [[1, 2], [3, 4]])
    np.testing.assert_allclose(verdict.delta, [2, 3])


def test_median_by_hand():
    np.testing.assert_allclose(hand("median", [[1], [2], [100]])[0].delta, [2])
    np.testing.assert_allclose(hand("median", [[1], [2], [3], [100]])[0].delta, [2.5])


def test_trimmed_mean_by_hand():
    verdict, _ = hand("trimmed_mean", [[1, 0], [2, 0], [3, 9], [100, 0], [-50, 0]], trim=1)
    np.testing.assert_allclose(verdict.delta, [2, 0])
    # trim_ratio 0.2 of k=5 -> trim 1 as well
    verdict, _ = hand("trimmed_mean", [[1], [2], [3], [100], [-50]], trim_ratio=0.2)
    np.testing.assert_allclose(verdict.delta, [2])


def test_krum_picks_the_point_nearest_its_neighbours():
    # f=0, k=4: each score sums the squared distances to the 2 nearest others.
    verdict, _ = hand("krum", [[0], [1], [3], [100]], num_byzantine=0)
    np.testing.assert_allclose(verdict.scores[:3], [1 + 9, 1 + 4, 4 + 9])
    np.testing.assert_allclose(verdict.delta, [1])
    np.testing.assert_allclose(verdict.weights, [0, 1, 0, 0])


def test_multi_krum_by_hand():
    verdict, _ = hand("multi_krum", [[0], [1], [3], [100]], num_byzantine=0, multi_krum_m=2)
    np.testing.assert_allclose(verdict.delta, [0.5])
    np.testing.assert_array_equal(verdict.flags, [False, False, True, True])
    np.testing.assert_allclose(verdict.weights, [0.5, 0.5, 0, 0])


def test_bulyan_by_hand():
    # k=7, f=1: Krum selects theta=5 points {0..4}; per coordinate the beta=3 values
    # nearest the median 2 are {1, 2, 3}, mean 2.
    verdict, _ = hand("bulyan", [[0], [1], [2], [3], [4], [50], [-50]], num_byzantine=1)
    np.testing.assert_allclose(verdict.delta, [2])
    np.testing.assert_array_equal(verdict.flags, [False] * 5 + [True] * 2)
    np.testing.assert_allclose(verdict.weights, [0.2] * 5 + [0, 0])


def test_geometric_median_is_the_median_on_a_line():
    verdict, _ = hand("geometric_median", [[0], [1], [10]], gm_iters=200)
    np.testing.assert_allclose(verdict.delta, [1], atol=1e-3)
    np.testing.assert_allclose(verdict.weights @ jnp.array([0.0, 1.0, 10.0]), verdict.delta[0])


def test_norm_clipping_by_hand():
    verdict, _ = hand("norm_clipping", [[3, 4], [0, 1]], clip_norm=1.0)
    np.testing.assert_allclose(verdict.delta, [0.3, 0.9], rtol=1e-6)
    np.testing.assert_allclose(verdict.scores, [5, 1])
    # clip_norm 0: clip to the median norm 3
    verdict, _ = hand("norm_clipping", [[3, 4], [0, 1]], clip_norm=0.0)
    np.testing.assert_allclose(verdict.delta, [0.9, 1.7], rtol=1e-6)


def test_centered_clipping_by_hand():
    verdict, memory = hand("centered_clipping", [[3, 4], [0, 0.5]], cc_tau=1.0)
    np.testing.assert_allclose(verdict.delta, [0.3, 0.65], rtol=1e-6)
    np.testing.assert_allclose(memory, verdict.delta)  # the next round's center
    verdict, _ = hand("centered_clipping", [[0.3, 0.65], [0.3, 0.65]], memory, cc_tau=1.0)
    np.testing.assert_allclose(verdict.delta, [0.3, 0.65], rtol=1e-6)


def test_foolsgold_zeroes_clients_that_look_alike():
    rows = np.zeros((3, C, F))
    rows[0, 0, 0] = rows[1, 0, 0] = 1.0  # two clients push the same way
    rows[2, 1, 1] = 1.0
    verdict, history = hand("foolsgold", [[1, 0], [1, 0], [0, 1]], head_rows=rows)
    np.testing.assert_allclose(verdict.weights, [0, 0, 1])
    np.testing.assert_allclose(verdict.delta, [0, 1])
    np.testing.assert_array_equal(verdict.flags, [True, True, False])
    np.testing.assert_allclose(history, rows.reshape(3, -1))


def test_fltrust_by_hand():
    updates = [[2, 0], [0, 3], [-1, 0], [1, 1]]
    verdict, _ = hand("fltrust", updates, root=[1, 0])
    # trust = relu(cos) = [1, 0, 0, 0.707]; updates rescaled to the root's norm 1
    s = np.sqrt(0.5)
    np.testing.assert_allclose(verdict.weights, np.array([1, 0, 0, s]) / (1 + s), rtol=1e-5)
    np.testing.assert_allclose(verdict.delta, np.array([1 + s * s, s * s]) / (1 + s), rtol=1e-5)
    np.testing.assert_array_equal(verdict.flags, [False, True, True, False])


def test_lfighter_flags_the_denser_cluster():
    # Classes 0 and 1 change most. Three honest clients spread out, two attackers agree.
    rows = np.zeros((5, C, 2))
    rows[:3, 0] = [[1.0, 0.0], [0.9, 0.4], [0.8, -0.4]]
    rows[:3, 1] = [[0.0, 1.0], [0.4, 0.9], [-0.3, 1.0]]
    rows[3:, 0] = [-1.0, 0.1]
    rows[3:, 1] = [0.1, -1.0]
    rows[:, 2] = 0.01
    updates = np.eye(5)
    verdict, _ = hand("lfighter", updates, head_rows=rows, head_features=2)
    np.testing.assert_array_equal(verdict.flags, [False, False, False, True, True])
    np.testing.assert_allclose(verdict.delta, [1 / 3, 1 / 3, 1 / 3, 0, 0], rtol=1e-6)
    assert verdict.scores[3:].min() > verdict.scores[:3].max()


def test_filter_falls_back_when_everyone_is_flagged():
    delta, weights = defenses.weighted_mean(jnp.ones((4, 3)), jnp.zeros(4))
    np.testing.assert_allclose(delta, jnp.zeros(3))
    np.testing.assert_allclose(weights, jnp.full(4, 0.25))


def test_detection_counts_by_hand():
    flags = jnp.array([True, True, False, False, True])
    truth = jnp.array([True, False, True, False, True])
    np.testing.assert_array_equal(defenses.detection_counts(flags, truth), [2, 1, 1, 1])
    assert defenses.detection_counts(flags, truth).dtype == jnp.int32


def test_auc_by_hand():
    labels = jnp.array([True, True, False, False])
    valid = jnp.ones(4, bool)
    auc = jax.jit(defenses.auc)
    assert float(auc(jnp.array([4.0, 3.0, 2.0, 1.0]), labels, valid)) == 1.0
    assert float(auc(jnp.array([1.0, 2.0, 3.0, 4.0]), labels, valid)) == 0.0
    assert float(auc(jnp.zeros(4), labels, valid)) == 0.5
    # one positive/negative pair tied, one ordered right, ... : (1 + 0.5 + 1 + 1) / 4
    assert float(auc(jnp.array([3.0, 2.0, 2.0, 1.0]), labels, valid)) == 0.875
    # masked entries are ignored, even when they would rank wrongly
    scores = jnp.array([4.0, 3.0, 2.0, 1.0, 9.0, -9.0])
    labels6 = jnp.array([True, True, False, False, False, True])
    valid6 = jnp.array([True] * 4 + [False] * 2)
    assert float(auc(scores, labels6, valid6)) == 1.0
    assert bool(jnp.isnan(auc(jnp.ones(2), jnp.array([True, True]), jnp.ones(2, bool))))


def test_auc_matches_sklearn():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, 40).astype(np.float32)  # many ties
    labels = rng.random(40) < 0.4
    got = defenses.auc(jnp.asarray(scores), jnp.asarray(labels), jnp.ones(40, bool))
    np.testing.assert_allclose(got, roc_auc_score(labels, scores), rtol=1e-6)


@pytest.mark.parametrize(
    "overrides, k, message",
    [
        ({"name": "nope"}, 5, "defense.name must be one of"),
        ({"mode": "quarantine"}, 5, "defense.mode must be one of"),
        ({"name": "krum", "mode": "block"}, 5, "defense.mode='block' needs defense.name='pca'"),
        ({"trim_ratio": 0.7}, 5, "defense.trim_ratio must be in [0, 0.5), got 0.7"),
        ({"name": "trimmed_mean", "trim": 3}, 5, "defense.trim must be < k/2"),
        ({"name": "krum", "num_byzantine": 1}, 4, "krum needs k > 2f+2"),
        ({"name": "multi_krum", "multi_krum_m": 9}, 5, "defense.multi_krum_m must be <= k=5"),
        ({"name": "bulyan", "num_byzantine": 1}, 5, "bulyan needs k >= 4f+3"),
        ({"source_class": 10}, 5, "defense.source_class must be in [0, 10)"),
        ({"window": 0}, 5, "defense.window must be >= 1"),
        ({"row_scale": "max"}, 5, "defense.row_scale must be one of"),
        ({"min_separation": -1.0}, 5, "defense.min_separation must be >= 0"),
        ({"cc_tau": -1.0}, 5, "defense.cc_tau must be >= 0"),
        ({"min_separation": float("inf")}, 5, "defense.min_separation must be a finite number"),
    ],
)
def test_validate_names_the_field(overrides, k, message):
    cfg = defenses.default_config()
    cfg.update(overrides)
    with pytest.raises(ValueError) as error:
        defenses.validate(cfg, clients_per_round=k, num_clients=50, num_classes=10)
    assert message in str(error.value)


def test_defaults_validate_for_the_paper_setup():
    for name in NAMES:
        cfg = defenses.default_config()
        cfg.name = name
        if name == "bulyan":  # needs k >= 4f + 3 = 7 with f = 1; with k = 5 only f = 0
            cfg.num_byzantine = 0
        defenses.validate(cfg, clients_per_round=5, num_clients=50, num_classes=10)
