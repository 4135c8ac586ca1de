"""Robust statistics over the stacked updates [k, d]: mean, median, trimmed mean, geometric
median, norm clipping, centered clipping.

Every function here is a factory returning a `Defense`. These rules do not flag clients and
ignore `defense.mode`: they always aggregate with their own rule. Their scores are each
update's distance to the rule's aggregate (its norm for norm clipping). Only the valid rows
take part (`RoundView.valid`, rows with a finite norm); counts are taken from their number n.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from fedjax_poison.defenses.base import (
    Defense,
    Verdict,
    make_verdict,
    no_memory,
    require,
    weighted_mean,
)
from fedjax_poison.defenses.numeric import (
    clean,
    masked_mean,
    masked_median,
    norms,
    scale_of,
    uniform_over,
)


def distances_to(updates: jax.Array, center: jax.Array) -> jax.Array:
    """[k] distance of each row of updates [k, d] to center [d] (no overflow of squares)."""
    return norms(updates - center[None, :])


def stateless(aggregate, *, flags_clients: bool = False) -> Defense:
    """A rule without memory from aggregate(valid [k], updates [k, d], view) -> Verdict."""

    def apply(view, memory):
        valid, updates = clean(view)
        return aggregate(valid, updates, view), memory

    return Defense(no_memory, apply, needs_root=False, flags_clients=flags_clients)


def fedavg() -> Defense:
    """Plain mean of the valid updates, weights 1/n (McMahan et al., AISTATS 2017)."""

    def aggregate(valid, updates, view) -> Verdict:
        delta, weights = weighted_mean(updates, valid.astype(jnp.float32))
        return make_verdict(delta, weights, valid=valid)

    return stateless(aggregate)


def median() -> Defense:
    """Coordinate-wise median of the valid updates; with n even, the mean of the two middle
    values (Yin et al., ICML 2018)."""

    def aggregate(valid, updates, view) -> Verdict:
        delta = masked_median(updates, valid)
        scores = distances_to(updates, delta)
        return make_verdict(delta, uniform_over(valid), scores=scores, valid=valid)

    return stateless(aggregate)


def trim_count(trim: int, trim_ratio: float, n: jax.Array) -> jax.Array:
    """Values dropped at each end: `trim` if >= 0, else floor(trim_ratio * n); at most
    (n - 1) // 2 so that one value is left."""
    ratio = jnp.floor(trim_ratio * n.astype(jnp.float32) + 1e-6).astype(jnp.int32)
    t = jnp.int32(trim) if trim >= 0 else ratio
    return jnp.clip(t, 0, jnp.maximum((n - 1) // 2, 0))


def trimmed_mean(*, trim: int, trim_ratio: float) -> Defense:
    """Coordinate-wise mean after dropping the t largest and t smallest values (Yin et al.,
    ICML 2018). t is a count: `trim`, or floor(trim_ratio * n) when trim is -1, n the valid
    rows (the paper's beta fraction times n, rounded down)."""
    require(trim >= -1, "trim", ">= 0 (or -1 for trim_ratio)", trim)
    require(0 <= trim_ratio < 0.5, "trim_ratio", "in [0, 0.5)", trim_ratio)

    def aggregate(valid, updates, view) -> Verdict:
        k, n = updates.shape[0], valid.sum()
        t = trim_count(trim, trim_ratio, n)
        ordered = jnp.sort(jnp.where(valid[:, None], updates, jnp.inf), axis=0)
        place = jnp.arange(k)[:, None]
        kept = (place >= t) & (place < n - t)
        delta = jnp.sum(jnp.where(kept, ordered, 0.0), axis=0) / jnp.maximum(n - 2 * t, 1)
        scores = distances_to(updates, delta)
        return make_verdict(delta, uniform_over(valid), scores=scores, valid=valid)

    return stateless(aggregate)


def geometric_median(*, gm_iters: int, gm_eps: float) -> Defense:
    """Smoothed Weiszfeld iterations from the mean of the valid updates (RFA, Pillutla et al.,
    IEEE TSP 2022): weights 1 / max(nu, distance) with nu = `gm_eps` in update units, as in
    RFA's smoothing; `gm_iters` + 1 steps. The result is the weighted mean of the last step.
    """
    require(gm_iters >= 1, "gm_iters", ">= 1", gm_iters)
    require(gm_eps > 0, "gm_eps", "> 0", gm_eps)

    def aggregate(valid, updates, view) -> Verdict:
        s = scale_of(updates, valid)  # Weiszfeld commutes with scaling; distances stay finite
        x, nu = updates / s, gm_eps / s

        def weights_at(center):
            w = jnp.where(valid, 1.0 / jnp.maximum(distances_to(x, center), nu), 0.0)
            return w / jnp.maximum(w.sum(), 1e-30)

        start = masked_mean(x, valid)
        center = lax.fori_loop(0, gm_iters, lambda _, v: weights_at(v) @ x, start)
        weights = weights_at(center)
        delta = (weights @ x) * s
        return make_verdict(delta, weights, scores=distances_to(updates, delta), valid=valid)

    return stateless(aggregate)


def clip_scales(updates: jax.Array, valid: jax.Array, clip_norm: float) -> jax.Array:
    """[k] factors min(1, bound / norm) that clip each valid row to the bound: `clip_norm`,
    or the median norm of the valid rows when clip_norm is 0; 0 for invalid rows."""
    size = norms(updates)
    bound = masked_median(size, valid) if clip_norm <= 0 else jnp.float32(clip_norm)
    scale = jnp.minimum(1.0, bound / jnp.maximum(size, 1e-30))
    return jnp.where(valid, scale, 0.0)


def norm_clipping(*, clip_norm: float) -> Defense:
    """Scale each update to norm at most `clip_norm` (0: the median norm of the valid
    updates), then average (Sun et al., "Can you really backdoor FL?", 2019)."""
    require(clip_norm >= 0, "clip_norm", ">= 0 (0: median norm)", clip_norm)

    def aggregate(valid, updates, view) -> Verdict:
        scale = clip_scales(updates, valid, clip_norm)
        delta = masked_mean(scale[:, None] * updates, valid)
        return make_verdict(delta, uniform_over(valid), scores=norms(updates), valid=valid)

    return stateless(aggregate)


def centered_clipping(*, num_params: int, cc_tau: float, cc_iters: int) -> Defense:
    """Clip each update's distance to a center at `cc_tau` and move the center by the mean
    over the valid updates, `cc_iters` times (Karimireddy, He and Jaggi, ICML 2021).

    The center starts at the last round's aggregate, kept in memory [d] (the server's
    momentum in the paper); `cc_tau` 0 means the median distance of the valid updates to
    that center. With no valid update the center stays where it was.
    """
    require(cc_tau >= 0, "cc_tau", ">= 0 (0: median distance)", cc_tau)
    require(cc_iters >= 1, "cc_iters", ">= 1", cc_iters)

    def init():
        return jnp.zeros((num_params,), jnp.float32)

    def apply(view, last):
        valid, updates = clean(view)
        spread = distances_to(updates, last)
        tau = masked_median(spread, valid) if cc_tau <= 0 else jnp.float32(cc_tau)

        def step(_, v):
            diff = updates - v[None, :]
            scale = jnp.minimum(1.0, tau / jnp.maximum(norms(diff), 1e-30))
            return v + masked_mean(scale[:, None] * diff, valid)

        delta = lax.fori_loop(0, cc_iters, step, last.astype(updates.dtype))
        scores = distances_to(updates, delta)
        weights = uniform_over(valid)
        return make_verdict(delta, weights, scores=scores, valid=valid), delta

    return Defense(init, apply, needs_root=False, flags_clients=False)
