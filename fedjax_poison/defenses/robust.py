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

    return Defense(no_memory, apply, root_size=0, flags_clients=flags_clients)


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


def trimmed_mean(*, clients_per_round: int, trim: int = -1, trim_ratio: float = 0.2) -> Defense:
    """Coordinate-wise mean after dropping the t largest and t smallest values (Yin et al.,
    ICML 2018). t is a count: `trim`, or floor(trim_ratio * n) when trim is -1, n the valid
    rows (the paper's beta fraction times n, rounded down)."""
    require(trim >= -1, "trim", ">= 0 (or -1 for trim_ratio)", trim)
    require(0 <= trim_ratio < 0.5, "trim_ratio", "in [0, 0.5)", trim_ratio)
    k = clients_per_round
    require(2 * trim < k, "trim", f"< k/2 with k={k}", trim)

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


def geometric_median(*, iters: int = 10, eps: float = 1e-6) -> Defense:
    """Smoothed Weiszfeld iterations from the coordinate-wise median of the valid updates
    (RFA, Pillutla et al., IEEE TSP 2022): weights 1 / max(nu, distance) with nu = `eps` in
    update units, as in RFA's smoothing; `iters` + 1 steps (the RFA paper finds a few
    enough). The result is the weighted mean of the last step.

    RFA starts from the mean; one huge finite update drags the mean, and a few steps from
    there do not come back (one row of 1e12 among five honest ones left 6e4 after 10 steps).
    The median start is already robust, and each step keeps it near the honest rows.
    """
    require(iters >= 1, "iters", ">= 1", iters)
    require(eps > 0, "eps", "> 0", eps)

    def aggregate(valid, updates, view) -> Verdict:
        s = scale_of(updates, valid)  # Weiszfeld commutes with scaling; distances stay finite
        x, nu = updates / s, eps / s

        def weights_at(center):
            w = jnp.where(valid, 1.0 / jnp.maximum(distances_to(x, center), nu), 0.0)
            return w / jnp.maximum(w.sum(), 1e-30)

        start = masked_median(x, valid)
        center = lax.fori_loop(0, iters, lambda _, v: weights_at(v) @ x, start)
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


def norm_clipping(*, clip_norm: float = 0.0) -> Defense:
    """Scale each update to norm at most `clip_norm` (0: the median norm of the valid
    updates), then average (Sun et al., "Can you really backdoor FL?", 2019)."""
    require(clip_norm >= 0, "clip_norm", ">= 0 (0: median norm)", clip_norm)

    def aggregate(valid, updates, view) -> Verdict:
        scale = clip_scales(updates, valid, clip_norm)
        delta = masked_mean(scale[:, None] * updates, valid)
        return make_verdict(delta, uniform_over(valid), scores=norms(updates), valid=valid)

    return stateless(aggregate)


def centered_clipping(*, num_params: int, tau: float = 0.0, iters: int = 1) -> Defense:
    """Clip each update's distance to a center at `tau` and move the center by the mean
    over the valid updates, `iters` times (Karimireddy, He and Jaggi, ICML 2021; the paper
    finds one iteration enough).

    The center starts at the last round's aggregate, kept in memory [d] (the server's
    momentum in the paper); `tau` 0 means the median distance of the valid updates to
    that center. With no valid update the center stays where it was.
    """
    require(tau >= 0, "tau", ">= 0 (0: median distance)", tau)
    require(iters >= 1, "iters", ">= 1", iters)

    def init():
        return jnp.zeros((num_params,), jnp.float32)

    def apply(view, last):
        valid, updates = clean(view)
        spread = distances_to(updates, last)
        tau_now = masked_median(spread, valid) if tau <= 0 else jnp.float32(tau)

        def step(_, v):
            diff = updates - v[None, :]
            scale = jnp.minimum(1.0, tau_now / jnp.maximum(norms(diff), 1e-30))
            return v + masked_mean(scale[:, None] * diff, valid)

        delta = lax.fori_loop(0, iters, step, last.astype(updates.dtype))
        scores = distances_to(updates, delta)
        weights = uniform_over(valid)
        return make_verdict(delta, weights, scores=scores, valid=valid), delta

    return Defense(init, apply, root_size=0, flags_clients=False)
