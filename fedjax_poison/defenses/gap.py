"""Exact k-means of one-dimensional values and the gap statistic (Tibshirani, Walther and
Hastie, 2001) that chooses how many clusters they hold, over masked fixed-shape vectors.

In one dimension an optimal k-means partition splits the sorted values into k runs, so its
inertia is a dynamic program over the [m, m] segment costs: exact, where scikit-learn's
KMeans (k-means++ and Lloyd) finds a local optimum. Every result depends on the values
alone, never on their positions.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

FLOOR = 1e-20  # the smallest inertia a logarithm is taken of (duplicates give exactly 0)


def sorted_first(values: jax.Array, valid: jax.Array) -> jax.Array:
    """The valid entries of values [m] in increasing order, then zeros -> [m]."""
    m = valid.shape[0]
    ordered = jnp.sort(jnp.where(valid, values, jnp.inf))
    return jnp.where(jnp.arange(m) < valid.sum(), ordered, 0.0)


def segment_costs(ordered: jax.Array, n: jax.Array) -> jax.Array:
    """[m, m] sum of squared deviations from their mean of ordered[i..j] (j >= i, j < n);
    inf elsewhere."""
    m = ordered.shape[0]
    x = ordered - jnp.sum(ordered) / jnp.maximum(n, 1)  # centred: prefix sums stay small
    x = jnp.where(jnp.arange(m) < n, x, 0.0)
    sums = jnp.concatenate([jnp.zeros(1), jnp.cumsum(x)])
    squares = jnp.concatenate([jnp.zeros(1), jnp.cumsum(x * x)])
    i, j = jnp.arange(m)[:, None], jnp.arange(m)[None, :]
    count = (j - i + 1).astype(jnp.float32)
    total = sums[j + 1] - sums[i]
    cost = squares[j + 1] - squares[i] - total * total / jnp.maximum(count, 1.0)
    return jnp.where((j >= i) & (j < n), jnp.maximum(cost, 0.0), jnp.inf)


def inertias(values: jax.Array, valid: jax.Array, max_clusters: int) -> jax.Array:
    """[max_clusters] the optimal k-means inertia of the valid values for k = 1, 2, ...
    (0 once k reaches their count)."""
    n = valid.sum()
    cost = segment_costs(sorted_first(values, valid), n)
    last = jnp.clip(n - 1, 0, values.shape[0] - 1)
    best = cost[0]  # [m] best cost of ordered[0..j] in one cluster
    out = [best[last]]
    for _ in range(1, max_clusters):
        before = jnp.concatenate([jnp.full((1,), jnp.inf), best[:-1]])  # clusters end at i - 1
        best = jnp.min(before[:, None] + cost, axis=0)
        out.append(best[last])
    out = jnp.stack(out)
    return jnp.where(jnp.arange(1, max_clusters + 1) < n, out, 0.0)


def gap_clusters(values, valid, key, samples: int, max_clusters: int) -> jax.Array:
    """[] int32 the number of clusters of the valid values [m] by the gap statistic.

    The values are scaled to [0, 1]; the reference is `samples` draws of as many uniform
    values on [0, 1] (from `key`). gap(k) = mean log W*_k - log W_k and s_k = sd(log W*_k)
    sqrt(1 + 1/B); the count is the smallest k with gap(k) >= gap(k + 1) - s_(k+1), k
    tried up to min(max_clusters, n - 1) (n clusters of n values have no inertia), that
    bound itself if none. 1 when the values do not spread (fewer than 3 or all equal)."""
    m = valid.shape[0]
    n = valid.sum()
    lo = jnp.min(jnp.where(valid, values, jnp.inf))
    hi = jnp.max(jnp.where(valid, values, -jnp.inf))
    spread = hi - lo
    scaled = (values - lo) / jnp.where(spread > 0, spread, 1.0)
    real = jnp.log(jnp.maximum(inertias(scaled, valid, max_clusters), FLOOR))
    draws = jax.random.uniform(key, (samples, m))
    first = jnp.arange(m) < n  # the reference draws as many values as there are valid ones
    fake = jnp.log(
        jnp.maximum(jax.vmap(inertias, (0, None, None))(draws, first, max_clusters), FLOOR)
    )  # [B, K]
    gap = jnp.mean(fake, axis=0) - real
    s = jnp.std(fake, axis=0) * jnp.sqrt(1.0 + 1.0 / samples)
    top = jnp.minimum(max_clusters, n - 1)  # the largest k tried
    k = jnp.arange(1, max_clusters)  # candidates 1 .. K-1, compared with k + 1
    stop = (gap[:-1] >= gap[1:] - s[1:]) & (k < top)
    chosen = jnp.where(stop.any(), jnp.argmax(stop) + 1, top) if max_clusters > 1 else top
    return jnp.where((n >= 3) & (spread > 0), chosen, 1).astype(jnp.int32)


def upper_cluster(values: jax.Array, valid: jax.Array) -> jax.Array:
    """[m] bool: the valid values in the upper of the optimal two clusters (exact 2-means;
    equal values are never split; none when all are equal)."""
    m = valid.shape[0]
    n = valid.sum()
    ordered = sorted_first(values, valid)
    cost = segment_costs(ordered, n)
    last = jnp.clip(n - 1, 0, m - 1)
    cut = jnp.arange(1, m)  # the upper cluster starts at ordered[cut]
    total = cost[0, cut - 1] + cost[cut, last]
    apart = (cut < n) & (ordered[cut] > ordered[cut - 1])
    best = cut[jnp.argmin(jnp.where(apart, total, jnp.inf))] if m > 1 else 0
    start = lax.dynamic_index_in_dim(ordered, best, 0, keepdims=False)
    return valid & apart.any() & (values >= start)
