"""RFLBAT (Wang, Zhai, Zhang, Li and Liu, 2022): PCA of the updates, outliers removed by their
summed distance in the PCA plane, k-means, the cluster whose members agree least by cosine
kept, and its own outliers removed again.

Where jit asks for fixed shapes the number of clusters is decided between one and two by
the gap statistic (Tibshirani et al.; a uniform reference over the plane's bounding box,
2-means from the farthest pair), where RFLBAT's code tries up to nine with k-means++.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fedjax_poison.defenses.base import (
    cosine_matrix,
    flagging_verdict,
    require,
    require_mode,
    weighted_mean,
)
from fedjax_poison.defenses.cluster import farthest_pair, two_means
from fedjax_poison.defenses.numeric import (
    masked_mean,
    masked_median,
    pow2,
    scale_of,
    sq_distances,
)
from fedjax_poison.defenses.robust import stateless

REFERENCE_STREAM = 0x4F1BA  # the gap statistic's uniform reference: a key of the round


def plane(updates: jax.Array, valid: jax.Array) -> jax.Array:
    """[k, 2] the valid rows' coordinates on their first two principal components, up to
    one power-of-two factor; each axis signed so that its sum of cubes is >= 0. A component
    at float32's noise level (variance below 1e-10 of the rows' mean square for the first,
    1e-5 of the first's for the second: identical rows, or one row 1e12 times the others)
    is taken as 0, and coordinates are rounded to 2^-20 of the largest, so that rounding
    never picks a direction or splits rows that coincide."""
    x = updates / scale_of(updates, valid)
    centred = jnp.where(valid[:, None], x - masked_mean(x, valid)[None, :], 0.0)
    values, vectors = jnp.linalg.eigh(centred @ centred.T)  # ascending
    total = jnp.sum(jnp.where(valid[:, None], x * x, 0.0))
    top, second = values[-1], values[-2]
    real = jnp.stack([top > 1e-10 * total, (second > 1e-5 * top) & (top > 1e-10 * total)])
    axes = centred.T @ vectors[:, ::-1][:, :2]  # [d, 2]: the principal directions
    axes = axes / jnp.maximum(jnp.sqrt(jnp.sum(axes * axes, axis=0)), 1e-30)[None, :]
    coords = centred @ axes  # equal rows project equally
    coords = jnp.where(valid[:, None] & real[None, :], coords, 0.0)
    grid = pow2(jnp.max(jnp.abs(coords))) * 2.0**-20  # rows apart by rounding alone coincide
    coords = jnp.round(coords / grid) * grid
    return coords * jnp.where(jnp.sum(coords**3, axis=0) < 0, -1.0, 1.0)[None, :]


def inliers(points: jax.Array, keep: jax.Array, factor: float) -> jax.Array:
    """[k] bool: the kept rows whose summed distance to the other kept rows is below
    `factor` times the median of those sums (at most: identical rows all stay)."""
    d = jnp.sqrt(jnp.maximum(sq_distances(points), 0.0))
    total = jnp.sum(jnp.where(keep[None, :], d, 0.0), axis=1)
    return keep & (total <= factor * masked_median(total, keep))


def inertia(points, members):
    """[] within-cluster sum of squares of the rows of points [k, 2] in each of `members`."""

    def one(mask):
        centre = jnp.sum(jnp.where(mask[:, None], points, 0.0), 0) / jnp.maximum(mask.sum(), 1)
        return jnp.sum(jnp.where(mask[:, None], (points - centre[None, :]) ** 2, 0.0))

    return sum(one(m) for m in members)


def split(points, keep, iters):
    """(in1 [k] bool: the second of two k-means clusters, W1, W2 inertias)."""
    in1 = two_means(points, keep, farthest_pair(points, keep), iters) & keep
    return in1, inertia(points, [keep]), inertia(points, [keep & ~in1, keep & in1])


def two_clusters(points, keep, key, samples: int, iters: int) -> jax.Array:
    """[] bool: the gap statistic prefers two clusters to one (gap(1) < gap(2) - s_2)."""
    _, w1, w2 = split(points, keep, iters)
    lo = jnp.min(jnp.where(keep[:, None], points, jnp.inf), axis=0)
    hi = jnp.max(jnp.where(keep[:, None], points, -jnp.inf), axis=0)
    lo, hi = jnp.where(keep.any(), lo, 0.0), jnp.where(keep.any(), hi, 0.0)
    draws = lo[None, None, :] + (hi - lo)[None, None, :] * jax.random.uniform(
        key, (samples,) + points.shape
    )
    _, f1, f2 = jax.vmap(lambda p: split(p, keep, iters))(draws)
    log = lambda w: jnp.log(jnp.maximum(w, 1e-30))
    gap1, gap2 = jnp.mean(log(f1)) - log(w1), jnp.mean(log(f2)) - log(w2)
    s2 = jnp.std(log(f2)) * jnp.sqrt(1.0 + 1.0 / samples)
    return (keep.sum() >= 3) & (gap1 < gap2 - s2)


def agreement(updates, members):
    """[] the median over the members of their mean cosine with the members (themselves
    included); 1 for a cluster of at most one."""
    cos = cosine_matrix(updates)
    mean = jnp.sum(jnp.where(members[None, :], cos, 0.0), axis=1) / jnp.maximum(members.sum(), 1)
    return jnp.where(members.sum() > 1, masked_median(mean, members), 1.0)


def rflbat(
    *,
    clients_per_round: int,
    mode: str,
    eps1: float = 10.0,
    eps2: float = 4.0,
    gap_samples: int = 20,
    kmeans_iters: int = 20,
):
    """RFLBAT (module docstring): rows whose summed distance in the PCA plane is at least
    more than `eps1` times the median are removed; if the gap statistic (`gap_samples` references)
    finds two clusters, 2-means in the plane and the cluster with the lower median mean
    cosine (of the whole updates) is kept (both on a tie); in it, rows more than `eps2`
    times its median summed distance are removed; the rest averaged (the paper's 10, 4).

    Flags: the rows not averaged. Scores: the summed distance in the plane over its median."""
    require(eps1 > 0, "eps1", "> 0", eps1)
    require(eps2 > 0, "eps2", "> 0", eps2)
    require(gap_samples >= 2, "gap_samples", ">= 2", gap_samples)
    require(kmeans_iters >= 1, "kmeans_iters", ">= 1", kmeans_iters)
    require_mode(mode)
    del clients_per_round  # one client: its own cluster

    def aggregate(valid, updates, view):
        points = plane(updates, valid)
        first = inliers(points, valid, eps1)
        key = jax.random.fold_in(jax.random.key(REFERENCE_STREAM), view.round)
        in1, _, _ = split(points, first, kmeans_iters)
        a0, a1 = agreement(updates, first & ~in1), agreement(updates, first & in1)
        chosen = jnp.where(a1 < a0, in1, jnp.where(a0 < a1, ~in1, True)) & first
        chosen = jnp.where(
            two_clusters(points, first, key, gap_samples, kmeans_iters), chosen, first
        )
        kept = inliers(points, chosen, eps2)
        d = jnp.sqrt(jnp.maximum(sq_distances(points), 0.0))
        total = jnp.sum(jnp.where(valid[None, :], d, 0.0), axis=1)
        med = masked_median(total, valid)
        scores = jnp.where(valid, total / jnp.where(med > 0, med, 1.0), 0.0)
        delta, weights = weighted_mean(updates, kept.astype(jnp.float32))
        return flagging_verdict(updates, valid & ~kept, scores, mode, (delta, weights), valid=valid)

    return stateless(aggregate, flags_clients=True)
