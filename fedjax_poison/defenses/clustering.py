"""Rules that keep the majority cluster of the round's updates: simple clustering (FLPoison's
DBSCAN majority) and Auror (Shen et al., ACSAC 2016).

Both flag the rows outside the cluster they keep. Clusters are computed exactly inside
jit, with every choice made by value: DBSCAN's border rows join the cluster of their
nearest core row (not the first to reach them), and clusters tied in size are all kept.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from fedjax_poison.defenses.base import (
    Defense,
    flagging_verdict,
    require,
    require_mode,
    require_two_clients,
    weighted_mean,
)
from fedjax_poison.defenses.cluster import farthest_pair, two_means
from fedjax_poison.defenses.numeric import (
    clean,
    masked_median,
    norms,
    row_key,
    scale_of,
    sq_distances,
)
from fedjax_poison.defenses.robust import distances_to, stateless


def dbscan_labels(d2: jax.Array, e2: jax.Array, valid: jax.Array, min_samples: int, key):
    """DBSCAN over squared distances d2 [k, k] with radius^2 e2 -> labels [k] uint32: a
    cluster's label is the smallest `key` [k] of its core rows; noise and invalid rows get
    the largest uint32. Border rows take the label of their nearest core row (ties: the
    smaller label)."""
    k = valid.shape[0]
    near = (d2 <= e2) & valid[:, None] & valid[None, :]
    core = valid & (near.sum(axis=1) >= min_samples)
    linked = (near & core[:, None] & core[None, :]) | jnp.eye(k, dtype=bool)

    def close(_, reach):
        return (reach.astype(jnp.float32) @ reach.astype(jnp.float32)) > 0

    steps = max(1, (k - 1).bit_length())
    reach = lax.fori_loop(0, steps, close, linked)
    none = jnp.uint32(jnp.iinfo(jnp.uint32).max)
    label = jnp.min(jnp.where(reach & core[None, :], key[None, :], none), axis=1)
    label = jnp.where(core, label, none)
    dist = jnp.where(near & core[None, :], d2, jnp.inf)  # to each core neighbour
    nearest = jnp.min(dist, axis=1)
    tied = (dist == nearest[:, None]) & jnp.isfinite(nearest)[:, None]
    border = jnp.min(jnp.where(tied, label[None, :], none), axis=1)
    return jnp.where(core, label, jnp.where(valid, border, none))


def largest_clusters(labels: jax.Array, valid: jax.Array) -> jax.Array:
    """[k] bool: the rows in a cluster of the largest size (all such clusters; noise is
    no cluster)."""
    none = jnp.uint32(jnp.iinfo(jnp.uint32).max)
    clustered = valid & (labels != none)
    size = jnp.sum((labels[:, None] == labels[None, :]) & clustered[None, :], axis=1)
    size = jnp.where(clustered, size, 0)
    return clustered & (size == jnp.max(size))


def k_distance(d2: jax.Array, valid: jax.Array, min_samples) -> jax.Array:
    """[] The median over the valid rows of the squared distance to their
    (min_samples - 1)-th nearest other valid row (Ester et al.'s k-distance heuristic for
    DBSCAN's radius: most rows are then core rows, an isolated one is not)."""
    k = valid.shape[0]
    others = valid[:, None] & valid[None, :] & ~jnp.eye(k, dtype=bool)
    ordered = jnp.sort(jnp.where(others, d2, jnp.inf), axis=1)
    index = jnp.clip(min_samples - 2, 0, k - 1)
    kth = lax.dynamic_index_in_dim(ordered, index, 1, keepdims=False)
    distance = jnp.sqrt(jnp.where(jnp.isfinite(kth), kth, 0.0))
    return masked_median(distance, valid) ** 2  # the median of distances, as DBSCAN's eps


def simple_clustering(
    *, clients_per_round: int, mode: str, eps: float = 0.0, min_samples: int = 3
) -> Defense:
    """Simple clustering (FLPoison's SimpleClustering, DBSCAN variant): DBSCAN over the
    valid updates with radius `eps` and `min_samples` (a row counts itself), the mean of
    the largest cluster; the rest are flagged. No cluster at all: the round keeps nobody.

    eps 0: the median over the valid updates of the distance to their (min_samples - 1)-th
    nearest other one (`k_distance`; FLPoison's fixed 0.05 is in its own update units, far
    below the distances of a round here, where every row would be noise). min_samples is
    capped at the valid rows."""
    require(eps >= 0, "eps", ">= 0 (0: the median pairwise distance)", eps)
    require(min_samples >= 1, "min_samples", ">= 1", min_samples)
    require_two_clients(clients_per_round)
    require_mode(mode)

    def aggregate(valid, updates, view):
        s = scale_of(updates, valid)
        d2 = sq_distances(updates / s)
        need = jnp.minimum(min_samples, valid.sum())
        e2 = k_distance(d2, valid, need) if eps <= 0 else (jnp.float32(eps) / s) ** 2
        labels = dbscan_labels(d2, e2, valid, need, row_key(updates))
        kept = largest_clusters(labels, valid)
        delta, weights = weighted_mean(updates, kept.astype(jnp.float32))
        scores = distances_to(updates, delta)
        flags = valid & ~kept
        return flagging_verdict(updates, flags, scores, mode, (delta, weights), valid=valid)

    return stateless(aggregate, flags_clients=True)


def split_1d(values: jax.Array, valid: jax.Array) -> jax.Array:
    """The distance between the two centres of the optimal 2-means of each column of
    values [k, p] over the valid rows -> [p] (exact: the best of the n - 1 splits of the
    sorted values; 0 with fewer than two valid rows)."""
    k = valid.shape[0]
    n = valid.sum()
    ordered = jnp.sort(jnp.where(valid[:, None], values, jnp.inf), axis=0)
    ordered = jnp.where(jnp.arange(k)[:, None] < n, ordered, 0.0)
    sums, squares = jnp.cumsum(ordered, axis=0), jnp.cumsum(ordered * ordered, axis=0)
    total, total_sq = sums[-1], squares[-1]
    left = jnp.arange(1, k + 1, dtype=jnp.float32)[:, None]  # rows in the lower cluster
    right = n.astype(jnp.float32) - left
    ok = right >= 1
    mean_l = sums / left
    mean_r = (total[None, :] - sums) / jnp.maximum(right, 1.0)
    sse = (squares - left * mean_l**2) + (total_sq[None, :] - squares - right * mean_r**2)
    best = jnp.argmin(jnp.where(ok, sse, jnp.inf), axis=0)
    gap = jnp.abs(jnp.take_along_axis(mean_r - mean_l, best[None, :], axis=0)[0])
    return jnp.where(n >= 2, gap, 0.0)


def auror(
    *,
    clients_per_round: int,
    num_classes: int,
    head_features: int,
    mode: str,
    threshold: float = 0.002,
    find_rounds: int = 10,
    kmeans_iters: int = 20,
) -> Defense:
    """Auror (Shen, Tople and Saxena, ACSAC 2016; FLPoison's version): in the first
    `find_rounds` rounds, the output-layer coordinates whose two 1-D 2-means centres over
    the round's valid clients lie at least `threshold` apart are the indicative features
    (kept in memory [C*F] bool, fixed from then on); each round the valid clients are
    2-means clustered on those coordinates (from the farthest pair) and the larger
    cluster is averaged, the other flagged (both kept on a tie, all kept with no
    indicative feature).

    The 1-D clustering is exact (the best split of the sorted values), where FLPoison runs
    scikit-learn's KMeans. Memory: the indicative mask; an invalid row takes no part."""
    require(threshold >= 0, "threshold", ">= 0", threshold)
    require(find_rounds >= 1, "find_rounds", ">= 1", find_rounds)
    require(kmeans_iters >= 1, "kmeans_iters", ">= 1", kmeans_iters)
    require_two_clients(clients_per_round)
    require_mode(mode)
    p = num_classes * head_features

    def init():
        return jnp.zeros((p,), bool)

    def apply(view, indicative):
        valid, updates = clean(view)
        k = valid.shape[0]
        heads = jnp.where(valid[:, None], view.head_rows.reshape(k, p), 0.0)
        finding = view.round < find_rounds
        found = split_1d(heads, valid) >= threshold
        indicative = jnp.where(finding & (valid.sum() >= 2), found, indicative)
        points = jnp.where(indicative[None, :], heads, 0.0)
        points = points / scale_of(points, valid)
        in1 = two_means(points, valid, farthest_pair(points, valid), kmeans_iters) & valid
        in0 = valid & ~in1
        n1, n0 = in1.sum(), in0.sum()
        kept = jnp.where(n1 > n0, in1, jnp.where(n0 > n1, in0, valid))
        kept = jnp.where(indicative.any(), kept, valid)
        delta, weights = weighted_mean(updates, kept.astype(jnp.float32))
        scores = norms(updates - delta[None, :])
        verdict = flagging_verdict(
            updates, valid & ~kept, scores, mode, (delta, weights), valid=valid
        )
        return verdict, indicative

    return Defense(init, apply, root_size=0, flags_clients=True)
