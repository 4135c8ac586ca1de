"""Divide-and-Conquer (Shejwalkar and Houmansadr, NDSS 2021, Algorithm 2): spectral outlier
removal on random coordinate subsamples."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fedjax_poison.defenses.base import (
    Defense,
    flagging_verdict,
    no_memory,
    require,
    require_mode,
    weighted_mean,
)
from fedjax_poison.defenses.numeric import (
    clean,
    masked_mean,
    norms,
    rescale,
    sample_coordinates,
    scale_of,
)

COORDINATE_STREAM = 0xD1C  # DnC's coordinate subsamples: a key of their own, with the round


def outlier_scores(sub: jax.Array, valid: jax.Array) -> jax.Array:
    """[k] squared projection of each centered valid row of sub [k, b] on the top right
    singular vector of the centered valid rows (0 for invalid rows)."""
    centered = jnp.where(valid[:, None], sub - masked_mean(sub, valid)[None, :], 0.0)
    # The top right singular vector from the Gram matrix [k, k] (k << b): v ~ X^T u for the
    # top eigenvector u of X X^T. Identical rows get identical scores.
    _, eigvec = jnp.linalg.eigh(centered @ centered.T)
    v = centered.T @ eigvec[:, -1]
    v = v / jnp.maximum(norms(v[None, :])[0], 1e-30)
    return jnp.where(valid, (centered @ v) ** 2, 0.0)


def dnc(
    *,
    clients_per_round: int,
    mode: str,
    num_byzantine: int = 1,
    iters: int = 5,
    subsample: int = 10000,
    c: float = 1.0,
) -> Defense:
    """DnC: `iters` times, draw b = `subsample` coordinates (all of them if d is
    smaller), score each valid update by its squared projection on the top singular vector
    of the centered subsample, and keep the n - floor(c * f) lowest (c = `c`,
    f = `num_byzantine`, n the valid rows; at least one; rows tied at the cut are all
    kept). The updates kept in every iteration are averaged; the others are flagged.

    The coordinates come from a key derived from the round alone, so every ordering of the
    clients sees the same subsamples. Rows are scaled by a power of two first (the scores
    scale exactly; squares of 1e18 cannot overflow). Scores: the mean outlier score over
    the iterations, in the updates' units (+inf where that overflows).
    """
    require(num_byzantine >= 0, "num_byzantine", ">= 0", num_byzantine)
    require(iters >= 1, "iters", ">= 1", iters)
    require(subsample >= 1, "subsample", ">= 1", subsample)
    require(c >= 0 and c == c, "c", ">= 0", c)
    require_mode(mode)
    removed = int(c * num_byzantine + 1e-9)
    k = clients_per_round
    require(removed < k, "c", f"< k/f: dnc removes floor(c*f)={removed} of k={k}", c)

    def apply(view, memory):
        valid, updates = clean(view)
        d = updates.shape[1]
        b = min(subsample, d)
        s = scale_of(updates, valid)
        scaled = updates / s
        n = valid.sum()
        keep_count = jnp.maximum(n - removed, jnp.minimum(n, 1))
        key = jax.random.fold_in(jax.random.key(COORDINATE_STREAM), view.round)

        def iteration(i):
            coords = sample_coordinates(jax.random.fold_in(key, i), d, b)
            score = outlier_scores(scaled[:, coords], valid)
            ahead = jnp.sum(valid[None, :] & (score[None, :] < score[:, None]), axis=1)
            return valid & (ahead < keep_count), score

        good, scores = jax.vmap(iteration)(jnp.arange(iters))
        good = jnp.all(good, axis=0)
        aggregate = weighted_mean(updates, good.astype(jnp.float32))
        scores = rescale(scores.mean(axis=0), s * s)
        return flagging_verdict(updates, ~good, scores, mode, aggregate, valid=valid), memory

    return Defense(no_memory, apply, root_size=0, flags_clients=True)
