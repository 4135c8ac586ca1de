"""SignGuard (Xu et al., "SignGuard: Byzantine-robust Federated Learning through
Collaborative Malicious Gradient Filtering", ICDCS 2022)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fedjax_poison.defenses.base import (
    Defense,
    flagging_verdict,
    no_memory,
    require,
    require_mode,
)
from fedjax_poison.defenses.cluster import two_means
from fedjax_poison.defenses.numeric import (
    clean,
    masked_mean,
    masked_median,
    norms,
    sample_coordinates,
)

COORDINATE_STREAM = 0x516  # SignGuard's coordinate subset: a key of its own, with the round


def sign_features(updates: jax.Array, coords: jax.Array) -> jax.Array:
    """[k, 3] fractions of positive, zero and negative values among the coordinates
    `coords` [b] of each row of updates [k, d]."""
    sub = updates[:, coords]
    b = coords.shape[0]
    positive, negative = jnp.sum(sub > 0, axis=1) / b, jnp.sum(sub < 0, axis=1) / b
    return jnp.stack([positive, 1.0 - positive - negative, negative], axis=1)


def _extreme(features: jax.Array, valid: jax.Array, sign: float) -> jax.Array:
    """The valid row of features [k, 3] first (sign 1) or last (sign -1) in the
    lexicographic order of (positive, negative) fractions -> [3]; a value, not a position."""
    pos = jnp.min(jnp.where(valid, sign * features[:, 0], jnp.inf))
    tied = valid & (sign * features[:, 0] == pos)
    neg = jnp.min(jnp.where(tied, sign * features[:, 2], jnp.inf))
    p, q = sign * pos, sign * neg
    return jnp.stack([p, 1.0 - p - q, q])


def sign_clusters(features: jax.Array, valid: jax.Array, iters: int) -> jax.Array:
    """[k] bool: the valid rows in the larger of two k-means clusters of the sign features
    (both clusters when they are the same size). k-means starts from the two extreme rows
    in lexicographic order, so the split does not depend on row order."""
    start = jnp.stack([_extreme(features, valid, 1.0), _extreme(features, valid, -1.0)])
    in1 = two_means(features, valid, start, iters)
    n1, n0 = jnp.sum(valid & in1), jnp.sum(valid & ~in1)
    return valid & jnp.where(n1 > n0, in1, jnp.where(n0 > n1, ~in1, True))


def signguard(
    *,
    mode: str,
    lower: float = 0.1,
    upper: float = 3.0,
    fraction: float = 0.1,
    kmeans_iters: int = 20,
) -> Defense:
    """SignGuard: keep the valid updates whose norm over the median norm M lies in
    [L, R] = [`lower`, `upper`] (the paper's 0.1 and 3.0) and which fall
    in the larger of two clusters of sign statistics (the fractions of positive, zero and
    negative values over a random `fraction` of the coordinates, at least one);
    clip the kept updates to M and average them. The rest are flagged.

    The paper clusters with MeanShift; here two-cluster k-means (`kmeans_iters` Lloyd steps),
    as in its simpler variant. The coordinates come from a key derived from the round
    alone. Scores: distance of the sign features to the kept rows' mean features.
    """
    require(0 <= lower <= 1, "lower", "in [0, 1] (the median norm passes)", lower)
    require(upper >= 1 and upper < float("inf"), "upper", ">= 1 (the median norm passes)", upper)
    require(0 < fraction <= 1, "fraction", "in (0, 1]", fraction)
    require(kmeans_iters >= 1, "kmeans_iters", ">= 1", kmeans_iters)
    require_mode(mode)

    def apply(view, memory):
        valid, updates = clean(view)
        d = updates.shape[1]
        size = norms(updates)
        bound = masked_median(size, valid)
        ratio = size / jnp.where(bound > 0, bound, 1.0)
        in_range = (ratio >= lower) & (ratio <= upper)
        in_range = valid & jnp.where(bound > 0, in_range, True)
        b = max(1, int(fraction * d + 1e-9))
        key = jax.random.fold_in(jax.random.key(COORDINATE_STREAM), view.round)
        coords = sample_coordinates(key, d, b)
        features = sign_features(updates, coords)
        kept = in_range & sign_clusters(features, valid, kmeans_iters)
        scale = jnp.minimum(1.0, bound / jnp.maximum(size, 1e-30))
        delta = masked_mean(scale[:, None] * updates, kept)
        weights = kept.astype(jnp.float32) / jnp.maximum(kept.sum(), 1)
        center = masked_mean(features, kept)
        scores = norms(features - center[None, :])
        verdict = flagging_verdict(updates, ~kept, scores, mode, (delta, weights), valid=valid)
        return verdict, memory

    return Defense(no_memory, apply, root_size=0, flags_clients=True)
