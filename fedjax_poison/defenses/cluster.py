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
