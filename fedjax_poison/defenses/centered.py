"""Rules that average the values or rows nearest a robust centre: Meamed around the
coordinate-wise median, MoNNA around a trusted vector (ByzFL's two rules of that kind).

f = `num_byzantine`, n the valid rows; the n - f nearest are taken with f at most n - 1,
and values or rows tied at the cut share the places left, so that neither rule depends on
the rows' order.
"""

from __future__ import annotations

import jax.numpy as jnp

from fedjax_poison.defenses.base import (
    Defense,
    flagging_verdict,
    make_verdict,
    no_memory,
    require,
    require_mode,
    weighted_mean,
)
from fedjax_poison.defenses.krum import trimmed_around_median
from fedjax_poison.defenses.numeric import clean, lowest_shares, pow2, row_key
from fedjax_poison.defenses.robust import distances_to, stateless


def kept_count(n, num_byzantine: int):
    """n - f with f at most n - 1 (0 when no row is valid)."""
    return jnp.where(n > 0, n - jnp.minimum(num_byzantine, jnp.maximum(n - 1, 0)), 0)


def meamed(*, clients_per_round: int, num_byzantine: int = 1) -> Defense:
    """Mean around median (Xie, Koyejo and Gupta, "Generalized Byzantine-tolerant SGD",
    2018; ByzFL's Meamed): per coordinate, the mean of the n - f values closest to the
    coordinate's median (n even: the mean of the two middle values). Flags nobody."""
    require(num_byzantine >= 0, "num_byzantine", ">= 0", num_byzantine)
    need = f"< k={clients_per_round}: meamed keeps n - f values"
    require(num_byzantine < clients_per_round, "num_byzantine", need, num_byzantine)

    def aggregate(valid, updates, view):
        keep = kept_count(valid.sum(), num_byzantine)
        delta = trimmed_around_median(updates, valid, keep)
        weights = valid.astype(jnp.float32) / jnp.maximum(valid.sum(), 1)
        return make_verdict(delta, weights, scores=distances_to(updates, delta), valid=valid)

    return stateless(aggregate)


def monna(*, mode: str, num_byzantine: int = 1, root_size: int = 100) -> Defense:
    """MoNNA (Farhadkhani et al., ICML 2023; ByzFL's MoNNA): the mean of the n - f valid
    rows nearest a trusted vector. The paper's pivot is an honest node's own vector
    (peer-to-peer); at a server the trusted vector is its own update on a clean root set
    of `root_size` examples (`RoundView.root_update`, as FLTrust's). Rows at equal
    distance at the cut share the places left. Rows not averaged are flagged; scores are
    distances to the pivot."""
    require(num_byzantine >= 0, "num_byzantine", ">= 0", num_byzantine)
    require(root_size >= 1, "root_size", ">= 1", root_size)
    require_mode(mode)

    def apply(view, memory):
        valid, updates = clean(view)
        pivot = view.root_update.astype(jnp.float32)
        s = pow2(
            jnp.maximum(
                jnp.max(jnp.where(valid[:, None], jnp.abs(updates), 0.0)), jnp.max(jnp.abs(pivot))
            )
        )
        near = jnp.sum(((updates - pivot[None, :]) / s) ** 2, axis=1)
        keep = kept_count(valid.sum(), num_byzantine)
        share = lowest_shares((near, row_key(updates)), valid, keep)
        delta, weights = weighted_mean(updates, share)
        scores = distances_to(updates, pivot)
        flags = valid & (share <= 0)
        verdict = flagging_verdict(updates, flags, scores, mode, (delta, weights), valid=valid)
        return verdict, memory

    return Defense(no_memory, apply, root_size=root_size, flags_clients=True)
