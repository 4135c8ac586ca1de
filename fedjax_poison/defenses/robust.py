"""Robust aggregation rules over the stacked updates [k, d].

Every function here is a factory returning a `Defense`. Rules that do not flag clients
ignore `defense.mode`: they always aggregate with their own rule. Their scores are each
update's distance to the rule's aggregate (a norm for clipping, the Krum score for Krum).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from fedjax_poison.defenses.base import (
    Defense,
    Verdict,
    flagging_verdict,
    make_verdict,
    no_memory,
    row_norms,
    sq_distances,
    uniform,
    weighted_mean,
)


def _distances_to(updates: jax.Array, center: jax.Array) -> jax.Array:
    return row_norms(updates - center[None, :])


def _stateless(aggregate, *, flags_clients: bool = False) -> Defense:
    def apply(view, memory):
        return aggregate(view.updates), memory

    return Defense(no_memory, apply, needs_root=False, flags_clients=flags_clients)


def fedavg() -> Defense:
    """Plain mean, weights 1/k (McMahan et al., AISTATS 2017)."""

    def aggregate(updates) -> Verdict:
        return make_verdict(updates.mean(axis=0), uniform(updates.shape[0]))

    return _stateless(aggregate)


def median() -> Defense:
    """Coordinate-wise median (Yin et al., ICML 2018)."""

    def aggregate(updates) -> Verdict:
        delta = jnp.median(updates, axis=0)
        k = updates.shape[0]
        return make_verdict(delta, uniform(k), scores=_distances_to(updates, delta))

    return _stateless(aggregate)


def trimmed_mean(*, trim: int) -> Defense:
    """Coordinate-wise mean after dropping the `trim` largest and smallest values
    (Yin et al., ICML 2018)."""

    def aggregate(updates) -> Verdict:
        k = updates.shape[0]
        kept = jnp.sort(updates, axis=0)[trim : k - trim]
        delta = kept.mean(axis=0)
        return make_verdict(delta, uniform(k), scores=_distances_to(updates, delta))

    return _stateless(aggregate)


def krum_scores(updates: jax.Array, num_byzantine: int, alive=None) -> jax.Array:
    """Krum score of each update [k]: summed squared distance to its k' - f - 2 nearest
    alive neighbours, k' the number alive (at least one neighbour); inf if not alive."""
    k = updates.shape[0]
    alive = jnp.ones((k,), bool) if alive is None else alive
    d = sq_distances(updates)
    usable = alive[None, :] & ~jnp.eye(k, dtype=bool)
    ordered = jnp.sort(jnp.where(usable, d, jnp.inf), axis=1)
    count = jnp.maximum(alive.sum() - num_byzantine - 2, 1)
    take = (jnp.arange(k)[None, :] < count) & jnp.isfinite(ordered)
    scores = jnp.sum(jnp.where(take, ordered, 0.0), axis=1)
    return jnp.where(alive, scores, jnp.inf)


def krum(*, num_byzantine: int) -> Defense:
    """The one update with the lowest Krum score (Blanchard et al., NeurIPS 2017)."""

    def aggregate(updates) -> Verdict:
        scores = krum_scores(updates, num_byzantine)
        chosen = jnp.argmin(scores)
        weights = jax.nn.one_hot(chosen, updates.shape[0], dtype=jnp.float32)
        return make_verdict(updates[chosen], weights, scores=scores)

    return _stateless(aggregate)


def multi_krum(*, num_byzantine: int, multi_krum_m: int, mode: str) -> Defense:
    """Mean of the m updates with the lowest Krum scores; the rest are flagged
    (Blanchard et al., NeurIPS 2017)."""

    def aggregate(updates) -> Verdict:
        scores = krum_scores(updates, num_byzantine)
        rank = jnp.argsort(jnp.argsort(scores))
        chosen = rank < multi_krum_m
        return flagging_verdict(
            updates, ~chosen, scores, mode, weighted_mean(updates, chosen.astype(jnp.float32))
        )

    return _stateless(aggregate, flags_clients=True)


def _bulyan_select(updates: jax.Array, num_byzantine: int, theta: int) -> jax.Array:
    """Bulyan's first phase: pick theta updates one at a time by Krum -> chosen [k] bool."""
    k = updates.shape[0]

    def pick(_, chosen):
        best = jnp.argmin(krum_scores(updates, num_byzantine, alive=~chosen))
        return chosen.at[best].set(True)

    return lax.fori_loop(0, theta, pick, jnp.zeros((k,), bool))


def bulyan(*, num_byzantine: int, mode: str) -> Defense:
    """Krum-select theta = k - 2f updates, then per coordinate average the beta = theta - 2f
    values closest to their median (El Mhamdi et al., ICML 2018). Unselected are flagged."""

    def aggregate(updates) -> Verdict:
        k, f = updates.shape[0], num_byzantine
        theta, beta = k - 2 * f, k - 4 * f
        chosen = _bulyan_select(updates, f, theta)
        ordered = jnp.sort(jnp.where(chosen[:, None], updates, jnp.inf), axis=0)
        med = (ordered[(theta - 1) // 2] + ordered[theta // 2]) / 2  # [d]
        gap = jnp.where(chosen[:, None], jnp.abs(updates - med[None, :]), jnp.inf)
        closest = jnp.argsort(gap, axis=0)[:beta]  # [beta, d]
        delta = jnp.take_along_axis(updates, closest, axis=0).mean(axis=0)
        weights = chosen.astype(jnp.float32) / theta
        scores = krum_scores(updates, f)
        return flagging_verdict(updates, ~chosen, scores, mode, (delta, weights))

    return _stateless(aggregate, flags_clients=True)


def geometric_median(*, gm_iters: int, gm_eps: float) -> Defense:
    """Smoothed Weiszfeld iterations from the mean (RFA, Pillutla et al., IEEE TSP 2022).

    The result is a weighted mean; its weights are the last iteration's.
    """

    def weiszfeld_weights(updates, center):
        w = 1.0 / jnp.maximum(_distances_to(updates, center), gm_eps)
        return w / w.sum()

    def aggregate(updates) -> Verdict:
        center = lax.fori_loop(
            0, gm_iters, lambda _, v: weiszfeld_weights(updates, v) @ updates, updates.mean(0)
        )
        weights = weiszfeld_weights(updates, center)
        delta = weights @ updates
        return make_verdict(delta, weights, scores=_distances_to(updates, delta))

    return _stateless(aggregate)


def norm_clipping(*, clip_norm: float) -> Defense:
    """Scale each update to norm at most `clip_norm` (0: this round's median norm), then
    average (Sun et al., "Can you really backdoor FL?", 2019)."""

    def aggregate(updates) -> Verdict:
        norms = row_norms(updates)
        bound = jnp.median(norms) if clip_norm <= 0 else jnp.float32(clip_norm)
        scale = jnp.minimum(1.0, bound / jnp.maximum(norms, 1e-30))
        delta = (scale[:, None] * updates).mean(axis=0)
        return make_verdict(delta, uniform(updates.shape[0]), scores=norms)

    return _stateless(aggregate)


def centered_clipping(*, num_params: int, cc_tau: float, cc_iters: int) -> Defense:
    """Clip each update's distance to a center at `cc_tau` and move the center by the mean,
    `cc_iters` times (Karimireddy, He and Jaggi, ICML 2021).

    The center starts at the last round's aggregate, kept in memory [d] (the server's
    momentum in the paper); `cc_tau` 0 means this round's median distance to that center.
    """

    def init():
        return jnp.zeros((num_params,), jnp.float32)

    def apply(view, last):
        updates = view.updates
        tau = jnp.median(_distances_to(updates, last)) if cc_tau <= 0 else jnp.float32(cc_tau)

        def step(_, v):
            diff = updates - v[None, :]
            scale = jnp.minimum(1.0, tau / jnp.maximum(row_norms(diff), 1e-30))
            return v + (scale[:, None] * diff).mean(axis=0)

        delta = lax.fori_loop(0, cc_iters, step, last.astype(updates.dtype))
        scores = _distances_to(updates, delta)
        return make_verdict(delta, uniform(updates.shape[0]), scores=scores), delta

    return Defense(init, apply, needs_root=False, flags_clients=False)
