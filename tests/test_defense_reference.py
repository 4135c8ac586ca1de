"""Each rule against a direct float64 numpy transcription of its paper's definition, on
random rounds (one with an invalid row: the reference then sees the other rows alone).

The transcriptions are written here from the papers, not from the rules' code; they follow
the conventions each rule's docstring states (Krum's n - f - 2 neighbours, trimming counts,
Bulyan's beta = theta - 2f, RFA's smoothing).
"""

import itertools

import jax
import numpy as np
import pytest
from test_defenses import C, D, F, K, build, random_rows, random_view, run

from fedjax_poison.defenses import backdoor, flame, fldetector
from fedjax_poison.testing import make_view

SEEDS = (11, 12, 13)
F_BYZ = 1  # num_byzantine of the default config


def rounds():
    """(views, the valid rows of each in float64): three random rounds, one with row 4 NaN."""
    rows = [random_rows(s) for s in SEEDS]
    rows[2][4, 0] = np.nan
    views = [random_view(s, r) for s, r in zip(SEEDS, rows)]
    return views, [r[np.isfinite(r).all(1)] for r in rows]


def sq_dist(x):
    return ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)


def krum_scores(x, f):
    """Blanchard et al.: sum of squared distances to the n - f - 2 closest other vectors."""
    n, d2 = len(x), sq_dist(x)
    return np.array([np.sort(np.delete(d2[i], i))[: max(n - f - 2, 1)].sum() for i in range(n)])


def mean_of_lowest(x, scores, m):
    return x[np.argsort(scores)[:m]].mean(0)


def bulyan(x, f):
    """El Mhamdi et al., Algorithm 1: theta = n - 2f recursive Krum picks, then per coordinate
    the beta = theta - 2f values closest to the median, averaged. The paper leaves ties open
    (with one neighbour, two mutual nearest rows tie exactly); as the rule's docstring says,
    the tied row nearer to all the rest wins."""
    left, picked = list(range(len(x))), []
    for _ in range(len(x) - 2 * f):
        scores = krum_scores(x[left], f)
        spread = sq_dist(x[left]).sum(1)
        tied = np.flatnonzero(scores == scores.min())
        picked.append(left.pop(int(tied[np.argmin(spread[tied])])))
    sel, beta = x[picked], len(picked) - 2 * f
    med = np.median(sel, axis=0)
    closest = np.argsort(np.abs(sel - med), axis=0)[:beta]
    return np.take_along_axis(sel, closest, axis=0).mean(0)


def geometric_median(x, iters, nu):
    """RFA's smoothed Weiszfeld: v <- sum_i w_i x_i / sum_i w_i, w_i = 1 / max(nu, |v - x_i|),
    from the coordinate-wise median (RFA starts from the mean; the rule's docstring says why
    it does not)."""
    v = np.median(x, axis=0)
    for _ in range(iters + 1):
        w = 1 / np.maximum(nu, np.linalg.norm(x - v, axis=1))
        v = w @ x / w.sum()
    return v


def clip_to(x, bound):
    norms = np.linalg.norm(x, axis=1)
    return x * np.minimum(1, bound / norms)[:, None]


def centered_clipping(x, center, tau, iters):
    for _ in range(iters):
        center = center + clip_to(x - center, tau).mean(0)
    return center


def foolsgold(history):
    """Fung et al., Algorithm 1 over every client's history (zero histories have cosine 0)."""
    norm = np.linalg.norm(history, axis=1)
    unit = history / np.where(norm > 0, norm, 1)[:, None]
    cs = unit @ unit.T - np.eye(len(history))
    maxcs = cs.max(1)
    for i in range(len(history)):
        for j in range(len(history)):
            if i != j and maxcs[i] < maxcs[j]:
                cs[i, j] = cs[i, j] * maxcs[i] / maxcs[j]
    wv = np.clip(1 - cs.max(1), 0, 1)
    wv = wv / wv.max()
    wv[wv == 1] = 0.99
    with np.errstate(divide="ignore"):
        wv = np.log(wv / (1 - wv)) + 0.5
    return np.clip(np.nan_to_num(wv, neginf=0, posinf=1), 0, 1)


def hdbscan_majority(x):
    """FLAME's clustering with scikit-learn's HDBSCAN over cosine distances."""
    from sklearn.cluster import HDBSCAN

    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    dist = np.clip(1 - unit @ unit.T, 0, 2)
    np.fill_diagonal(dist, 0)
    n = len(x)
    hdb = HDBSCAN(
        min_cluster_size=n // 2 + 1,
        min_samples=1,
        allow_single_cluster=True,
        metric="precomputed",
        copy=True,
    )
    labels = hdb.fit(dist).labels_
    if labels.max() < 0:
        return np.ones(n, bool)
    return labels == np.bincount(labels[labels >= 0]).argmax()


def dnc(x, f, c):
    """Shejwalkar and Houmansadr, Algorithm 2, with every coordinate in the subsample (b >= d:
    every iteration sees the same matrix)."""
    centered = x - x.mean(0)
    v = np.linalg.svd(centered, full_matrices=False)[2][0]
    scores = (centered @ v) ** 2
    return np.argsort(scores)[: len(x) - int(c * f)]


def two_means(points, start, iters):
    centers = start.copy()
    for _ in range(iters):
        assign = ((points - centers[1]) ** 2).sum(1) < ((points - centers[0]) ** 2).sum(1)
        for c, members in enumerate([~assign, assign]):
            if members.any():
                centers[c] = points[members].mean(0)
    return ((points - centers[1]) ** 2).sum(1) < ((points - centers[0]) ** 2).sum(1)


def signguard(x, lower, upper, iters):
    """Xu et al.: median-norm band, then the larger of two sign-statistic clusters (all
    coordinates), clipped to the median norm and averaged."""
    norms = np.linalg.norm(x, axis=1)
    med = np.median(norms)
    band = (norms / med >= lower) & (norms / med <= upper)
    feats = np.stack([(x > 0).mean(1), (x == 0).mean(1), (x < 0).mean(1)], 1)
    order = np.lexsort((feats[:, 2], feats[:, 0]))  # by positive, then negative fraction
    in1 = two_means(feats, feats[[order[0], order[-1]]], iters)
    sizes = in1.sum(), (~in1).sum()
    larger = in1 if sizes[0] > sizes[1] else ~in1 if sizes[1] > sizes[0] else in1 | ~in1
    kept = band & larger
    return clip_to(x[kept], med).mean(0), kept


def lfighter(heads, iters):
    """Jebreel et al.: the output rows of the two classes with the largest summed norm,
    2-means from the farthest pair, and the cluster with the lower size-weighted inverse
    density (n_c / n * mean over members of 1 - their lowest cosine to another member) is
    flagged -> flags."""
    n = len(heads)
    top2 = np.argsort(-np.linalg.norm(heads, axis=2).sum(0), kind="stable")[:2]
    data = heads[:, top2].reshape(n, -1)
    i, j = np.unravel_index(np.argmax(sq_dist(data)), (n, n))
    in1 = two_means(data, data[[i, j]].copy(), iters)
    unit = data / np.linalg.norm(data, axis=1, keepdims=True)
    cos = unit @ unit.T

    def inverse_density(members):
        idx = np.flatnonzero(members)
        lowest = [min((cos[a, b] for b in idx if b != a), default=0.0) for a in idx]
        return len(idx) / n * np.mean([1 - low for low in lowest]) if len(idx) else 0.0

    density0, density1 = inverse_density(~in1), inverse_density(in1)
    bad_is_1 = not density0 < density1  # a tie flags nobody, as the rule's docstring says
    return (in1 == bad_is_1) & in1.any() & (~in1).any() & (density0 != density1)


def nnm(x, f):
    """Allouah et al.: each vector replaced by the mean of its n - f nearest, itself included."""
    d2 = sq_dist(x)
    return np.stack([x[np.argsort(d2[i])[: len(x) - f]].mean(0) for i in range(len(x))])


def best_subset_mean(x, f, criterion):
    """The mean of the n - f rows whose criterion (of the subset's rows) is the smallest.
    Several subsets often tie (the rules' docstrings: MDA's diameter is one pair's
    distance, which many subsets share); they share the choice: the mean of their means."""
    subsets = [list(s) for s in itertools.combinations(range(len(x)), len(x) - f)]
    values = np.array([criterion(x[s]) for s in subsets])
    tied = [s for s, v in zip(subsets, values) if v <= values.min() * (1 + 1e-9)]
    return np.mean([x[s].mean(0) for s in tied], axis=0)


def diameter(x):
    """El Mhamdi et al.'s MDA: the largest distance between two of the rows."""
    return np.sqrt(sq_dist(x).max())


def top_eigenvalue(x):
    """SMEA (Allouah et al. 2023): the largest eigenvalue of the rows' empirical covariance."""
    centred = x - x.mean(0)
    return np.linalg.eigvalsh(centred.T @ centred / len(x))[-1]


def caf(x, f):
    """Allouah, Guerraoui and Stephan's filter, with the exact top eigenpair of the d x d
    weighted covariance, tau's maximum over the rows still weighted, and the first
    iterate always counted (the rule's documented conventions)."""
    n = len(x)
    c, best, best_mu = np.ones(n), np.inf, None
    while True:
        mu = c @ x / c.sum()
        z = x - mu
        values, vectors = np.linalg.eigh((c[:, None] * z).T @ z / c.sum())
        if values[-1] < best:
            best, best_mu = values[-1], mu
        tau = np.where(c > 0, (z @ vectors[:, -1]) ** 2, 0)
        c = c * (1 - tau / tau.max())
        if c.sum() <= n - 2 * f:
            return best_mu


def meamed(x, f):
    """Xie et al.: per coordinate, the mean of the n - f values closest to the median."""
    closest = np.argsort(np.abs(x - np.median(x, axis=0)), axis=0)[: len(x) - f]
    return np.take_along_axis(x, closest, axis=0).mean(0)


def robust_lr(x, threshold):
    """Ozdayi et al.: the server's rate per coordinate is +1 where |sum of signs| >= theta,
    else -1, times the mean update."""
    return np.where(np.abs(np.sign(x).sum(0)) >= threshold, 1, -1) * x.mean(0)


def arc(x, f):
    """Allouah et al. 2024: the floor(2 f / n (n - f)) largest rows clipped to the norm of
    the largest one left."""
    n, norms = len(x), np.linalg.norm(x, axis=1)
    clipped = int(np.floor(2 * f / n * (n - f)))
    return clip_to(x, np.sort(norms)[n - clipped - 1])


REFERENCES = {
    "fedavg": lambda x: x.mean(0),
    "median": lambda x: np.median(x, axis=0),
    "trimmed_mean": lambda x: np.sort(x, 0)[int(0.2 * len(x)) : len(x) - int(0.2 * len(x))].mean(0),
    "krum": lambda x: x[np.argmin(krum_scores(x, F_BYZ))],
    "multi_krum": lambda x: mean_of_lowest(x, krum_scores(x, F_BYZ), len(x) - F_BYZ),
    "bulyan": lambda x: bulyan(x, F_BYZ),
    "geometric_median": lambda x: geometric_median(x, 10, 1e-6),
    "norm_clipping": lambda x: clip_to(x, np.median(np.linalg.norm(x, axis=1))).mean(0),
    "centered_clipping": lambda x: centered_clipping(
        x, np.zeros(D), np.median(np.linalg.norm(x, axis=1)), 1
    ),
    "dnc": lambda x: x[dnc(x, F_BYZ, 1.0)].mean(0),
    "nnm+krum": lambda x: nnm(x, F_BYZ)[np.argmin(krum_scores(nnm(x, F_BYZ), F_BYZ))],
    "mda": lambda x: best_subset_mean(x, F_BYZ, diameter),
    "smea": lambda x: best_subset_mean(x, F_BYZ, top_eigenvalue),
    "caf": lambda x: caf(x, F_BYZ),
    "meamed": lambda x: meamed(x, F_BYZ),
    "robust_lr": lambda x: robust_lr(x, np.ceil(0.4 * len(x))),  # the default theta 0
    "arc+fedavg": lambda x: arc(x, F_BYZ).mean(0),
    "arc+median": lambda x: np.median(arc(x, F_BYZ), axis=0),
    "norm_clipping+trimmed_mean": lambda x: REFERENCES["trimmed_mean"](
        clip_to(x, np.median(np.linalg.norm(x, axis=1)))
    ),
}


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_matches_the_papers_definition(name):
    views, valid_rows = rounds()
    for (verdict, _), x in zip(run(name, views), valid_rows):
        np.testing.assert_allclose(verdict.delta, REFERENCES[name](x), rtol=2e-4, atol=2e-5)


def test_krum_scores_match():
    views, valid_rows = rounds()
    for (verdict, _), view, x in zip(run("krum", views), views, valid_rows):
        got = verdict.scores[np.asarray(view.valid)]
        np.testing.assert_allclose(got, krum_scores(x, F_BYZ), rtol=1e-4)


def test_foolsgold_matches_fung_et_al():
    views, _ = rounds()
    for (verdict, history), view in zip(run("foolsgold", views), views):
        wv = foolsgold(np.asarray(history, np.float64))[np.asarray(view.client_ids)]
        wv = np.where(view.valid, wv, 0)
        if wv.sum() > 0:
            np.testing.assert_allclose(verdict.weights, wv / wv.sum(), rtol=1e-4, atol=1e-6)
        np.testing.assert_array_equal(verdict.flags, view.valid & (wv <= 0))


def test_fltrust_matches_cao_et_al():
    views, valid_rows = rounds()
    for (verdict, _), view, x in zip(run("fltrust", views), views, valid_rows):
        root = np.asarray(view.root_update, np.float64)
        cos = x @ root / np.linalg.norm(x, axis=1) / np.linalg.norm(root)
        trust = np.maximum(cos, 0)
        scaled = x / np.linalg.norm(x, axis=1)[:, None] * np.linalg.norm(root)
        np.testing.assert_allclose(verdict.delta, trust @ scaled / trust.sum(), rtol=2e-4)


def test_lfighter_matches_jebreel_et_al():
    views, valid_rows = rounds()
    for (verdict, _), view, x in zip(run("lfighter", views), views, valid_rows):
        valid = np.asarray(view.valid)
        flags = lfighter(np.asarray(view.head_rows, np.float64)[valid], 20)
        np.testing.assert_array_equal(verdict.flags[valid], flags)
        np.testing.assert_allclose(verdict.delta, x[~flags].mean(0), rtol=2e-4, atol=2e-5)


def test_flame_matches_hdbscan_clip_and_noise():
    views, valid_rows = rounds()
    for (verdict, _), view, x in zip(run("flame", views), views, valid_rows):
        kept = hdbscan_majority(x)
        np.testing.assert_array_equal(verdict.flags[np.asarray(view.valid)], ~kept)
        med = np.median(np.linalg.norm(x, axis=1))
        key = jax.random.fold_in(jax.random.key(flame.NOISE_STREAM), view.round)
        noise = 0.001 * med * np.asarray(jax.random.normal(key, (D,)), np.float64)
        want = clip_to(x[kept], med).mean(0) + noise
        np.testing.assert_allclose(verdict.delta, want, rtol=2e-4, atol=2e-5)


def test_signguard_matches_xu_et_al():
    views, valid_rows = rounds()
    out = run("signguard", views, fraction=1.0)
    for (verdict, _), view, x in zip(out, views, valid_rows):
        want, kept = signguard(x, 0.1, 3.0, 20)
        np.testing.assert_array_equal(verdict.flags[np.asarray(view.valid)], ~kept)
        np.testing.assert_allclose(verdict.delta, want, rtol=2e-4, atol=2e-5)


def test_flame_clustering_matches_hdbscan_where_rounds_split():
    # Two directions: 6 clients one way, 4 another; HDBSCAN keeps the 6.
    rng = np.random.default_rng(0)
    x = rng.normal(size=(K, D)) * 0.3
    x[:6] += rng.normal(size=D)
    x[6:] += rng.normal(size=D)
    verdict, _ = run("flame", [random_view(0, x)])[0]
    np.testing.assert_array_equal(verdict.flags, ~hdbscan_majority(x))
    np.testing.assert_array_equal(verdict.flags, [False] * 6 + [True] * 4)


def test_monna_matches_farhadkhani_et_al():
    """The mean of the n - f rows nearest the trusted vector (here the server's root update)."""
    views, valid_rows = rounds()
    for (verdict, _), view, x in zip(run("monna", views), views, valid_rows):
        root = np.asarray(view.root_update, np.float64)
        nearest = np.argsort(np.linalg.norm(x - root, axis=1))[: len(x) - F_BYZ]
        np.testing.assert_allclose(verdict.delta, x[nearest].mean(0), rtol=2e-4, atol=2e-5)
        flagged = np.ones(len(x), bool)
        flagged[nearest] = False
        np.testing.assert_array_equal(verdict.flags[np.asarray(view.valid)], flagged)


def test_weak_dp_matches_sun_et_al():
    """Clip to the median norm, average, add N(0, sigma^2) per coordinate."""
    views, valid_rows = rounds()
    for (verdict, _), view, x in zip(run("weak_dp", views), views, valid_rows):
        key = jax.random.fold_in(jax.random.key(backdoor.NOISE_STREAM), view.round)
        noise = 0.025 * np.asarray(jax.random.normal(key, (D,)), np.float64)
        want = clip_to(x, np.median(np.linalg.norm(x, axis=1))).mean(0) + noise
        np.testing.assert_allclose(verdict.delta, want, rtol=2e-4, atol=2e-5)


def test_subset_rules_flag_the_rows_left_out():
    """MDA and SMEA drop the row far from the others, whichever position it holds."""
    rows = random_rows(21)
    rows[6] += 8.0
    for name in ("mda", "smea"):
        verdict, _ = run(name, [random_view(0, rows)])[0]
        np.testing.assert_array_equal(verdict.flags, np.arange(K) == 6, err_msg=name)
        np.testing.assert_allclose(verdict.delta, np.delete(rows, 6, 0).mean(0), rtol=2e-4)


def dbscan_majority(x, min_samples=3):
    """FLPoison's simple clustering: scikit-learn's DBSCAN with eps the median over rows of
    the distance to their (min_samples - 1)-th nearest other row (the rule's default), the
    largest cluster kept (ties: all kept)."""
    from sklearn.cluster import DBSCAN

    dist = np.sqrt(sq_dist(x))
    eps = np.median(np.sort(dist, axis=1)[:, min_samples - 1])  # column 0: the row itself
    labels = DBSCAN(eps=eps, min_samples=min_samples).fit(x).labels_
    sizes = np.bincount(labels[labels >= 0])
    return np.isin(labels, np.flatnonzero(sizes == sizes.max()))


def clustered_rounds():
    """Random rounds, and rounds of 6 rows close together and 4 spread out."""
    views, valid_rows = rounds()
    rng = np.random.default_rng(31)
    for seed in (32, 33):
        rows = rng.normal(size=(K, D))
        rows[:6] = rng.normal(size=D) + 0.2 * rng.normal(size=(6, D))
        views.append(random_view(seed, rows))
        valid_rows.append(rows)
    return views, valid_rows


def test_simple_clustering_matches_dbscan():
    views, valid_rows = clustered_rounds()
    for (verdict, _), view, x in zip(run("simple_clustering", views), views, valid_rows):
        kept = dbscan_majority(x)
        np.testing.assert_array_equal(verdict.flags[np.asarray(view.valid)], ~kept)
        np.testing.assert_allclose(verdict.delta, x[kept].mean(0), rtol=2e-4, atol=2e-5)
    verdict, _ = run("simple_clustering", views[-1:])[0]
    np.testing.assert_array_equal(verdict.flags, np.arange(K) >= 6)


def auror_kept(heads, threshold, iters):
    """Shen et al.'s Auror on the output-layer rows [n, p]: the features whose best 1-D
    2-means split (tried at every cut of the sorted values) has centres >= threshold apart,
    then 2-means on them from the farthest pair; the larger cluster (both on a tie)."""
    n = len(heads)
    indicative = []
    for column in heads.T:
        v = np.sort(column)
        cuts = [
            (
                ((v[:i] - v[:i].mean()) ** 2).sum() + ((v[i:] - v[i:].mean()) ** 2).sum(),
                abs(v[i:].mean() - v[:i].mean()),
            )
            for i in range(1, n)
        ]
        indicative.append(min(cuts)[1] >= threshold)
    points = heads[:, np.array(indicative)]
    if points.shape[1] == 0:
        return np.ones(n, bool)
    i, j = np.unravel_index(np.argmax(sq_dist(points)), (n, n))
    in1 = two_means(points, points[[i, j]].copy(), iters)
    return in1 if in1.sum() > n / 2 else ~in1 if in1.sum() < n / 2 else np.ones(n, bool)


def test_auror_matches_shen_et_al():
    views, valid_rows = clustered_rounds()
    views = [v._replace(round=np.int32(0)) for v in views]  # a round that finds features
    for (verdict, _), view, x in zip(run("auror", views), views, valid_rows):
        valid = np.asarray(view.valid)
        heads = np.asarray(view.head_rows, np.float64)[valid].reshape(valid.sum(), -1)
        kept = auror_kept(heads, 0.002, 20)
        np.testing.assert_array_equal(verdict.flags[valid], ~kept)
        np.testing.assert_allclose(verdict.delta, x[kept].mean(0), rtol=2e-4, atol=2e-5)


def test_auror_keeps_its_features_after_the_finding_rounds():
    """After `find_rounds`, the indicative features are the memory's, not the round's."""
    views, _ = clustered_rounds()
    late = [v._replace(round=np.int32(10)) for v in views]  # 0-based: the 11th round
    nothing = np.zeros(C * F, bool)
    for verdict, memory in run("auror", late, nothing, find_rounds=10):
        np.testing.assert_array_equal(memory, nothing)
        np.testing.assert_array_equal(verdict.flags, np.zeros(K, bool))  # all kept


def test_robust_lr_with_the_papers_count():
    """theta = 4 as in the paper's 10-agent runs: the same formula with a fixed count."""
    views, valid_rows = rounds()
    for (verdict, _), x in zip(run("robust_lr", views, threshold=4), valid_rows):
        np.testing.assert_allclose(verdict.delta, robust_lr(x, 4), rtol=2e-4, atol=2e-5)


def kmeans_inertia(values, k):
    """The optimal k-means inertia of 1-D values, by trying every split of the sorted values
    into k runs."""
    v = np.sort(values)
    best = np.inf
    for cuts in itertools.combinations(range(1, len(v)), k - 1):
        parts = np.split(v, cuts)
        best = min(best, sum(((p - p.mean()) ** 2).sum() for p in parts))
    return best


def gap_count(scores, draws, max_clusters):
    """Tibshirani et al.'s gap statistic over scores scaled to [0, 1], against the uniform
    reference `draws` [B, n]: the smallest k with gap(k) >= gap(k+1) - s(k+1)."""
    n = len(scores)
    if n < 3 or scores.max() == scores.min():
        return 1
    x = (scores - scores.min()) / (scores.max() - scores.min())
    top = min(max_clusters, n - 1)
    logs = lambda v, k: np.log(max(kmeans_inertia(v, k), 1e-20))
    gap, s = [], []
    for k in range(1, top + 1):
        fake = np.array([logs(d, k) for d in draws])
        gap.append(fake.mean() - logs(x, k))
        s.append(fake.std() * np.sqrt(1 + 1 / len(draws)))
    return next((k for k in range(1, top) if gap[k - 1] >= gap[k] - s[k]), top)


def upper_of_two(scores):
    """The upper cluster of the optimal 1-D 2-means (every cut of the sorted values)."""
    v = np.sort(scores)
    costs = [
        ((v[:i] - v[:i].mean()) ** 2).sum() + ((v[i:] - v[i:].mean()) ** 2).sum()
        for i in range(1, len(v))
    ]
    return scores >= v[1 + int(np.argmin(costs))]


class FLDetectorReference:
    """Zhang et al.'s FLDetector on pseudo-gradients g = -head update, in float64: the
    L-BFGS compact form over the last `window` (s, y) pairs (FLDetector's own formula, with
    an explicit inverse), each client predicted from its last update and the global head
    then, its distances normalised by the round's sum and averaged over its last `window`."""

    def __init__(self, window):
        self.window, self.s, self.y = window, [], []
        self.last, self.clients, self.distances = None, {}, {}

    def hvp(self, v):
        s, y = np.array(self.s).T, np.array(self.y).T  # [p, m]
        sy = s.T @ y
        lower = np.tril(sy, -1)
        sigma = self.y[-1] @ self.s[-1] / (self.s[-1] @ self.s[-1])
        m = np.block([[sigma * s.T @ s, lower], [lower.T, -np.diag(np.diag(sy))]])
        q = np.concatenate([s.T @ (sigma * v), y.T @ v])
        return sigma * v - np.concatenate([sigma * s, y], axis=1) @ np.linalg.inv(m) @ q

    def round(self, ids, grads, head, key, samples=20, max_clusters=10):
        """-> (scores, flags) of the round's clients (ids [n], grads [n, p] float64)."""
        predicted = [i for i in ids if i in self.clients and self.s]
        miss = {}
        for i in predicted:
            g, h = self.clients[i]
            miss[i] = np.linalg.norm(g + self.hvp(head - h) - grads[list(ids).index(i)])
        total = sum(miss.values())
        for i in predicted:
            self.distances[i] = (self.distances.get(i, []) + [miss[i] / total])[-self.window :]
        scores = np.array([np.mean(self.distances[i]) if i in self.distances else 0 for i in ids])
        scored = np.array([i in self.distances for i in ids])
        draws = np.asarray(jax.random.uniform(key, (samples, len(ids))), np.float64)
        flags = np.zeros(len(ids), bool)
        if gap_count(scores[scored], draws[:, : scored.sum()], max_clusters) >= 2:
            flags[scored] = upper_of_two(scores[scored])
        grad = grads[~flags].mean(0)
        if self.last is not None:
            self.s = (self.s + [head - self.last[0]])[-self.window :]
            self.y = (self.y + [grad - self.last[1]])[-self.window :]
        self.last = (head, grad)
        for i, g in zip(ids, grads):
            self.clients[i] = (g, head)
        return scores, flags


def test_fldetector_matches_zhang_et_al():
    """Ten rounds of 5 of 8 clients on a quadratic (two attackers send scaled, reversed,
    noisy updates): every round's scores and flags as the float64 transcription's."""
    num, k, window = 8, 5, 3
    defense = build("fldetector", k=k, d=C * F, num_clients=num, window=window)
    apply = jax.jit(defense.apply)
    rng = np.random.default_rng(0)
    curvature = rng.uniform(0.5, 2.0, C * F)
    targets = 0.3 * rng.normal(size=(num, C * F))
    w, memory, ref = rng.normal(size=C * F), defense.init(), FLDetectorReference(window)
    flagged = 0
    for t in range(10):
        ids = np.sort(rng.permutation(num)[:k])
        grads = curvature * w - targets[ids] + 0.01 * rng.normal(size=(k, C * F))
        delta = -0.1 * grads
        bad = ids < 2
        delta[bad] = -3 * delta[bad] + 0.3 * rng.normal(size=(bad.sum(), C * F))
        view = make_view(delta, ids=ids, round_=t, global_head=w.reshape(C, F))
        verdict, memory = apply(view, memory)
        key = jax.random.fold_in(jax.random.key(fldetector.REFERENCE_STREAM), t)
        head = np.asarray(view.global_head, np.float64).reshape(-1)
        scores, flags = ref.round(ids, -np.asarray(view.updates, np.float64), head, key)
        np.testing.assert_allclose(verdict.scores, scores, rtol=2e-3, atol=1e-6, err_msg=t)
        np.testing.assert_array_equal(verdict.flags, flags, err_msg=f"round {t}")
        flagged += flags.sum()
        w = w + np.asarray(verdict.delta, np.float64)
    assert flagged > 0


def flare_trust(heads, neighbours=0.5, temperature=1.0):
    """Wang et al.'s FLARE on the output-layer changes [n, C, F] as sets of C vectors: the
    Gaussian-kernel MMD (width: the median distance between rows of different or the same
    set, the row itself left out), votes from each client's floor(0.5 n) nearest others,
    trust = softmax(votes / temperature)."""
    n, c, f = heads.shape
    rows = heads.reshape(n * c, f)
    d2 = sq_dist(rows)
    h2 = np.median(d2[~np.eye(n * c, dtype=bool)])
    kernel = np.exp(-d2 / (2 * h2)).reshape(n, c, n, c).mean(axis=(1, 3))
    mmd = np.diag(kernel)[:, None] + np.diag(kernel)[None, :] - 2 * kernel
    votes = np.zeros(n)
    for i in range(n):
        others = [j for j in np.argsort(mmd[i]) if j != i]
        votes[others[: int(np.floor(neighbours * n))]] += 1
    trust = np.exp(votes / temperature)
    return trust / trust.sum()


def test_flare_matches_wang_et_al():
    views, valid_rows = clustered_rounds()
    for (verdict, _), view, x in zip(run("flare", views), views, valid_rows):
        valid = np.asarray(view.valid)
        trust = flare_trust(np.asarray(view.head_rows, np.float64)[valid])
        np.testing.assert_allclose(verdict.weights[valid], trust, rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(verdict.delta, trust @ x, rtol=2e-4, atol=2e-5)


def deepsight_kept(heads, x, tau=1 / 3):
    """Rieger et al.'s DeepSight without DDifs on the output-layer changes [n, C, F]: NEUPs
    and threshold exceedings (TE <= median / 2: suspicious), scikit-learn's DBSCAN
    (min_samples 2, eps the median nearest-neighbour distance; noise rows alone) over the
    cosine distances and the NEUPs' distances, clusters of both kept when under tau
    suspicious, clipped to the median norm -> (aggregate, kept)."""
    from sklearn.cluster import DBSCAN

    n, c, _ = heads.shape
    energy = np.abs(heads).sum(-1) ** 2
    neup = energy / energy.sum(1, keepdims=True)
    te = (neup > max(0.01, 1 / c) * neup.max(1, keepdims=True)).sum(1)
    suspicious = te <= np.median(te) / 2

    def together(dist):
        eps = np.median(np.sort(dist, axis=1)[:, 1])
        labels = DBSCAN(eps=eps, min_samples=2, metric="precomputed").fit(dist).labels_
        labels = np.where(labels < 0, -1 - np.arange(n), labels)  # noise: alone
        return labels[:, None] == labels[None, :]

    flat = heads.reshape(n, -1)
    unit = flat / np.linalg.norm(flat, axis=1, keepdims=True)
    cosine = np.clip(1 - unit @ unit.T, 0, 2)
    np.fill_diagonal(cosine, 0)
    same = together(cosine) & together(np.sqrt(sq_dist(neup)))
    kept = np.array([suspicious[same[i]].mean() < tau for i in range(n)])
    med = np.median(np.linalg.norm(x, axis=1))
    return clip_to(x[kept], med).mean(0), kept


def test_deepsight_matches_rieger_et_al():
    views, valid_rows = clustered_rounds()
    rng = np.random.default_rng(41)  # a round where 4 clients push one class's row
    rows = rng.normal(size=(K, D))
    rows[:4, :F] += 8.0 + 0.1 * rng.normal(size=(4, F))
    views.append(random_view(41, rows))
    valid_rows.append(rows)
    for (verdict, _), view, x in zip(run("deepsight", views), views, valid_rows):
        valid = np.asarray(view.valid)
        want, kept = deepsight_kept(np.asarray(view.head_rows, np.float64)[valid], x)
        np.testing.assert_array_equal(verdict.flags[valid], ~kept)
        np.testing.assert_allclose(verdict.delta, want, rtol=2e-4, atol=2e-5)
    np.testing.assert_array_equal(verdict.flags, np.arange(K) < 4)


def rflbat_kept(x, key, eps1=10.0, eps2=4.0, samples=20, iters=20):
    """Wang et al.'s RFLBAT with the number of clusters (one or two) by the gap statistic
    against the rule's uniform draws over the plane's bounding box -> kept [n]."""
    from sklearn.decomposition import PCA

    n = len(x)
    pts = PCA(n_components=2, svd_solver="full").fit_transform(x)
    pts = pts * np.where((pts**3).sum(0) < 0, -1, 1)

    def inliers(keep, factor):
        total = np.sqrt(sq_dist(pts[keep])).sum(1)
        out = np.zeros(n, bool)
        out[np.flatnonzero(keep)[total <= factor * np.median(total)]] = True
        return out

    def inertias(p):
        i, j = np.unravel_index(np.argmax(sq_dist(p)), (len(p), len(p)))
        in1 = two_means(p, p[[i, j]].copy(), iters)
        within = lambda q: ((q - q.mean(0)) ** 2).sum() if len(q) else 0.0
        return in1, within(p), within(p[~in1]) + within(p[in1])

    first = inliers(np.ones(n, bool), eps1)
    in1, w1, w2 = inertias(pts[first])
    lo, hi = pts[first].min(0), pts[first].max(0)
    u = np.asarray(jax.random.uniform(key, (samples, n, 2)), np.float64)[:, first]
    fake = np.log([inertias(lo + (hi - lo) * d)[1:] for d in u])  # [B, 2]
    gap = fake.mean(0) - np.log([w1, w2])
    chosen = first.copy()
    if first.sum() >= 3 and gap[0] < gap[1] - fake[:, 1].std() * np.sqrt(1 + 1 / samples):
        unit = x / np.linalg.norm(x, axis=1, keepdims=True)

        def agreement(members):
            idx = np.flatnonzero(first)[members]
            if len(idx) <= 1:
                return 1.0
            return np.median((unit[idx] @ unit[idx].T).mean(1))

        a0, a1 = agreement(~in1), agreement(in1)
        if a0 != a1:
            chosen[np.flatnonzero(first)[in1 if a0 < a1 else ~in1]] = False  # keeps the other
    return inliers(chosen, eps2)


def test_rflbat_matches_wang_et_al():
    from fedjax_poison.defenses import rflbat

    views, valid_rows = clustered_rounds()
    rng = np.random.default_rng(51)  # 3 clients close together, far from the rest
    rows = rng.normal(size=(K, D))
    rows[:3] = 6.0 + 0.1 * rng.normal(size=(3, D))
    views.append(random_view(51, rows))
    valid_rows.append(rows)
    for (verdict, _), view, x in zip(run("rflbat", views), views, valid_rows):
        key = jax.random.fold_in(jax.random.key(rflbat.REFERENCE_STREAM), view.round)
        kept = rflbat_kept(x, key)
        np.testing.assert_array_equal(verdict.flags[np.asarray(view.valid)], ~kept)
        np.testing.assert_allclose(verdict.delta, x[kept].mean(0), rtol=2e-4, atol=2e-5)
    assert verdict.flags[:3].all()


def lasa_reference(x, layers, sparsity=0.3, lambda_n=2.0, lambda_s=1.0):
    """Xu et al.'s LASA on the valid rows x [n, d] with the layers' sizes `layers`: clip to
    the median norm, keep the floor((1 - sparsity) d) largest magnitudes of each row, then
    per layer the rows whose norm and PDP = (1 + sum sign / sum |sign|) / 2 (1/2 for an
    all-zero layer) have MZ-scores |v - median| / std (0 when std is 0) below lambda_n and
    lambda_s (all rows when none is) averaged -> (aggregate [d], kept [n, L])."""
    n, d = x.shape
    x = clip_to(x, np.median(np.linalg.norm(x, axis=1)))
    keep = int(np.floor((1 - sparsity) * d + 1e-6))
    sparse = np.zeros_like(x)
    for i in range(n):
        top = np.argsort(-np.abs(x[i]))[:keep]
        sparse[i, top] = x[i, top]

    def mz(v):
        std = np.std(v)
        return np.abs(v - np.median(v)) / std if std > 0 else np.zeros_like(v)

    parts, kept = [], []
    for layer in np.split(sparse, np.cumsum(layers)[:-1], axis=1):
        signs, count = np.sign(layer).sum(1), np.abs(np.sign(layer)).sum(1)
        pdp = 0.5 * (1 + np.divide(signs, count, out=np.zeros(n), where=count > 0))
        benign = (mz(np.linalg.norm(layer, axis=1)) < lambda_n) & (mz(pdp) < lambda_s)
        benign = benign if benign.any() else np.ones(n, bool)
        parts.append(layer[benign].mean(0))
        kept.append(benign)
    return np.concatenate(parts), np.stack(kept, axis=1)


def test_lasa_matches_xu_et_al():
    """Aggregate, weights (a client's share of the coordinates) and flags (left out of more
    than half of them) against the transcription, on random rounds and on one where three
    clients push every coordinate up: their layers' directions give them away."""
    from fedjax_poison.testing import LAYERS

    views, valid_rows = rounds()
    rng = np.random.default_rng(61)
    rows = rng.normal(size=(K, D))
    rows[:3] = 2.0 + 0.1 * rng.normal(size=(3, D))
    views.append(random_view(61, rows))
    valid_rows.append(rows)
    share = np.asarray(LAYERS) / D
    for (verdict, _), view, x in zip(run("lasa", views), views, valid_rows):
        valid = np.asarray(view.valid)
        want, kept = lasa_reference(x, LAYERS)
        np.testing.assert_allclose(verdict.delta, want, rtol=2e-4, atol=2e-5)
        weights = (kept / kept.sum(0) * share).sum(1)
        np.testing.assert_allclose(verdict.weights[valid], weights, rtol=1e-5, atol=1e-7)
        np.testing.assert_array_equal(verdict.flags[valid], (~kept * share).sum(1) > 0.5)
    assert verdict.flags[:3].all() and not verdict.flags[3:].any()
    assert verdict.weights[:3].sum() < 0.05  # 0.3 under FedAvg


def test_lasa_filters_layer_by_layer():
    """A client whose largest layer points against everyone else's loses that layer only:
    the other layers still average it in."""
    rows = np.abs(random_rows(62))  # every coordinate of every client up
    rows[0, 15:45] *= -1  # the third layer (LAYERS = 12, 3, 30, 5): PDP 0 against 1
    verdict, _ = run("lasa", [random_view(62, rows)], sparsity=0.0, lambda_n=10.0)[0]
    x = clip_to(rows, np.median(np.linalg.norm(rows, axis=1)))
    np.testing.assert_allclose(verdict.delta[15:45], x[1:, 15:45].mean(0), rtol=2e-4)
    np.testing.assert_allclose(verdict.delta[:15], x[:, :15].mean(0), rtol=2e-4)
    np.testing.assert_allclose(verdict.delta[45:], x[:, 45:].mean(0), rtol=2e-4)
    np.testing.assert_allclose(verdict.weights[0], (12 + 3 + 5) / D / K, rtol=1e-5)
    np.testing.assert_allclose(verdict.scores, np.where(np.arange(K) == 0, 30 / D, 0.0))
    assert verdict.flags[0] and not verdict.flags[1:].any()  # out of 30 of the 50 parameters


def crfl_reference(x, params, t, key, clip=15.0, start=2.0, growth=0.1, sigma=0.01):
    """Xie et al.'s CRFL round: the global model params + mean(x) clipped to
    min(clip, start + growth t), plus N(0, sigma^2 I) from `key` -> the change [d]."""
    w = params + x.mean(0)
    w = w * min(1.0, min(clip, start + growth * t) / np.linalg.norm(w))
    noise = sigma * np.asarray(jax.random.normal(key, w.shape), np.float64)
    return w + noise - params


def test_crfl_matches_xie_et_al():
    from fedjax_poison.defenses import crfl

    views, valid_rows = rounds()
    views = [v._replace(round=np.int32(t)) for v, t in zip(views, (0, 20, 200))]  # rho 2, 4, 15
    for (verdict, _), view, x in zip(run("crfl", views), views, valid_rows):
        t = int(view.round)
        key = jax.random.fold_in(jax.random.key(crfl.NOISE_STREAM), t)
        params = np.asarray(view.global_params, np.float64)
        want = crfl_reference(x, params, t, key)
        np.testing.assert_allclose(verdict.delta, want, rtol=2e-4, atol=2e-5)
        norm = np.linalg.norm(params + x.mean(0))
        assert (norm > min(15.0, 2.0 + 0.1 * t)) == (t < 200)  # the clip acts, then not
