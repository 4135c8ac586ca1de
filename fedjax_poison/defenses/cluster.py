"""Two-cluster k-means and the silhouette, over masked fixed-shape point sets (jittable)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from fedjax_poison.defenses.base import sq_distances


def masked_mean(x: jax.Array, mask: jax.Array, fallback: jax.Array) -> jax.Array:
    """Mean of the rows of x [m, p] where mask [m]; `fallback` [p] if none."""
    n = mask.sum()
    total = jnp.sum(jnp.where(mask[:, None], x, 0.0), axis=0)
    return jnp.where(n > 0, total / jnp.maximum(n, 1), fallback)


def two_means(points, valid, start, iters: int) -> jax.Array:
    """Lloyd's k-means with 2 centers from `start` [2, p] -> assign [m] bool (True = center 1).

    points [m, p]; rows with valid=False take no part (their assignment is meaningless).
    A center that loses all its points stays where it was.
    """

    def assign(centers):
        d0 = jnp.sum((points - centers[0][None, :]) ** 2, axis=-1)
        d1 = jnp.sum((points - centers[1][None, :]) ** 2, axis=-1)
        return d1 < d0

    def step(_, centers):
        a = assign(centers)
        c0 = masked_mean(points, valid & ~a, centers[0])
        c1 = masked_mean(points, valid & a, centers[1])
        return jnp.stack([c0, c1])

    return assign(lax.fori_loop(0, iters, step, start.astype(points.dtype)))


def farthest_pair(points: jax.Array, valid: jax.Array) -> jax.Array:
    """The two valid rows of points [m, p] farthest apart -> [2, p] (deterministic init)."""
    d = sq_distances(points)
    both = valid[:, None] & valid[None, :]
    flat = jnp.argmax(jnp.where(both, d, -1.0))
    i, j = jnp.divmod(flat, points.shape[0])
    return jnp.stack([points[i], points[j]])


def silhouette(points, valid, assign) -> jax.Array:
    """Mean silhouette of a 2-clustering over the valid points -> [] in [-1, 1].

    Points alone in their cluster count 0, as in scikit-learn; 0 if a cluster is empty.
    """
    dist = jnp.sqrt(jnp.maximum(sq_distances(points), 0.0))  # [m, m]
    same = assign[:, None] == assign[None, :]
    other = valid[None, :]
    not_self = ~jnp.eye(points.shape[0], dtype=bool)
    n_same = jnp.sum(same & other & not_self, axis=1)
    n_diff = jnp.sum(~same & other, axis=1)
    a = jnp.sum(jnp.where(same & other & not_self, dist, 0.0), axis=1) / jnp.maximum(n_same, 1)
    b = jnp.sum(jnp.where(~same & other, dist, 0.0), axis=1) / jnp.maximum(n_diff, 1)
    denom = jnp.maximum(a, b)
    s = jnp.where((n_same > 0) & (denom > 0), (b - a) / jnp.where(denom > 0, denom, 1.0), 0.0)
    both = jnp.any(valid & assign) & jnp.any(valid & ~assign)
    mean = jnp.sum(jnp.where(valid, s, 0.0)) / jnp.maximum(valid.sum(), 1)
    return jnp.where(both, mean, 0.0)


def spanning_tree(dist: jax.Array, valid: jax.Array):
    """Prim's minimum spanning tree over the valid points of dist [m, m] -> edges (a, b, w),
    each [m - 1], sorted by weight; edges past the valid count have w = inf."""
    m = dist.shape[0]
    d = jnp.where(valid[:, None] & valid[None, :], dist, jnp.inf)
    start = jnp.argmax(valid)

    def step(i, carry):
        in_tree, best, parent, a, b, w = carry
        cand = jnp.where(in_tree | ~valid, jnp.inf, best)
        j = jnp.argmin(cand)
        ok = jnp.isfinite(cand[j])
        a, b, w = a.at[i].set(parent[j]), b.at[i].set(j), w.at[i].set(cand[j])
        in_tree = in_tree.at[j].set(in_tree[j] | ok)
        closer = ok & (d[j] < best)
        return in_tree, jnp.where(closer, d[j], best), jnp.where(closer, j, parent), a, b, w

    in_tree = jnp.zeros((m,), bool).at[start].set(True)
    edges = jnp.zeros((m - 1,), jnp.int32)
    carry = (in_tree, d[start], jnp.full((m,), start), edges, edges, jnp.full((m - 1,), jnp.inf))
    *_, a, b, w = lax.fori_loop(0, m - 1, step, carry)
    order = jnp.argsort(w)
    return a[order], b[order], w[order]


def majority_cluster(dist: jax.Array, valid: jax.Array) -> jax.Array:
    """The points HDBSCAN keeps over a precomputed distance matrix dist [m, m] with
    min_cluster_size = n // 2 + 1 (n valid points), min_samples = 1 and a single cluster
    allowed -> [m] bool.

    With min_samples = 1 the mutual reachability is the distance itself, so HDBSCAN's
    hierarchy is single linkage; with a minimum size above n / 2 at most one cluster exists
    at any level, and the points kept are those of the component that first reaches the
    size as the level grows (below it every piece is too small).
    """
    m = dist.shape[0]
    need = valid.sum() // 2 + 1
    a, b, w = spanning_tree(dist, valid)

    def merge(labels, i, use):
        return jnp.where(use & (labels == labels[b[i]]), labels[a[i]], labels)

    def reach(i, carry):
        labels, level = carry
        labels = merge(labels, i, jnp.isfinite(w[i]))
        size = jnp.sum((labels == labels[a[i]]) & valid)
        return labels, jnp.where(jnp.isinf(level) & (size >= need), w[i], level)

    start = jnp.arange(m)
    _, level = lax.fori_loop(0, m - 1, reach, (start, jnp.float32(jnp.inf)))
    labels = lax.fori_loop(
        0, m - 1, lambda i, lab: merge(lab, i, jnp.isfinite(w[i]) & (w[i] <= level)), start
    )
    size = jnp.sum((labels[:, None] == labels[None, :]) & valid[None, :], axis=1)
    return valid & (size >= need)
