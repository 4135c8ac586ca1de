"""Rules that judge clients by the direction of their updates: FoolsGold, FLTrust, LFighter.

All three flag clients. mode 'detect': flags reported, aggregate = plain FedAvg;
mode 'filter': the rule's own aggregate.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fedjax_poison.defenses.base import (
    Defense,
    cosine_matrix,
    flagging_verdict,
    no_memory,
    row_norms,
    weighted_mean,
)
from fedjax_poison.defenses.cluster import farthest_pair, masked_mean, two_means


def foolsgold_weights(history: jax.Array) -> tuple[jax.Array, jax.Array]:
    """FoolsGold's learning rates over all N clients' histories [N, p] -> (wv [N], maxcs [N]).

    Cosine similarity, pardoning, rescale to max 1, logit with confidence 1, clip to [0, 1].
    """
    n = history.shape[0]
    eye = jnp.eye(n, dtype=bool)
    cs = jnp.where(eye, 0.0, cosine_matrix(history))
    maxcs = jnp.max(cs, axis=1)
    pardon = (maxcs[:, None] < maxcs[None, :]) & ~eye
    ratio = maxcs[:, None] / jnp.where(pardon, maxcs[None, :], 1.0)
    cs = jnp.where(pardon, cs * ratio, cs)
    wv = jnp.clip(1.0 - jnp.max(cs, axis=1), 0.0, 1.0)
    top = jnp.max(wv)
    wv = jnp.where(top > 0, wv / jnp.where(top > 0, top, 1.0), 0.0)
    wv = jnp.where(wv >= 1.0, 0.99, wv)
    logit = jnp.log(wv) - jnp.log1p(-wv) + 0.5  # -inf at wv = 0, clipped to 0 below
    return jnp.clip(jnp.nan_to_num(logit, nan=0.0, neginf=0.0), 0.0, 1.0), maxcs


def foolsgold(*, num_clients: int, num_classes: int, head_features: int, mode: str) -> Defense:
    """Down-weight clients whose summed updates point the same way (Fung et al., RAID 2020).

    Memory: each client's summed output-layer change [N, C*F] (not the full update, so the
    memory stays O(N*C*F); the output layer is where FoolsGold's paper and LFighter's code
    look). Weight 0 = flagged.
    """

    def init():
        return jnp.zeros((num_clients, num_classes * head_features), jnp.float32)

    def apply(view, history):
        k = view.client_ids.shape[0]
        history = history.at[view.client_ids].add(view.head_rows.reshape(k, -1))
        wv, maxcs = foolsgold_weights(history)
        share = wv[view.client_ids]
        flags = share <= 0
        aggregate = weighted_mean(view.updates, share)
        scores = maxcs[view.client_ids]
        return flagging_verdict(view.updates, flags, scores, mode, aggregate), history

    return Defense(init, apply, needs_root=False, flags_clients=True)


def fltrust(*, mode: str) -> Defense:
    """Trust = ReLU(cosine with the server's root update); updates rescaled to the root's
    norm, averaged by trust (Cao et al., NDSS 2021). Zero trust = flagged."""

    def apply(view, memory):
        updates, root = view.updates, view.root_update
        norms, root_norm = row_norms(updates), jnp.sqrt(jnp.sum(root * root))
        cos = (updates @ root) / jnp.maximum(norms * root_norm, 1e-30)
        trust = jax.nn.relu(cos)
        scaled = updates * (root_norm / jnp.maximum(norms, 1e-30))[:, None]
        delta, weights = weighted_mean(scaled, trust)
        verdict = flagging_verdict(updates, trust <= 0, -cos, mode, (delta, weights))
        return verdict, memory

    return Defense(no_memory, apply, needs_root=True, flags_clients=True)


def _inverse_density(cos: jax.Array, members: jax.Array) -> jax.Array:
    """LFighter's size-weighted inverse density of one cluster: n/k * mean_i (1 - min_j cos_ij)
    over members i and other members j (a lone member's min is taken as 0, as in its code)."""
    k = cos.shape[0]
    others = members[None, :] & ~jnp.eye(k, dtype=bool)
    lowest = jnp.min(jnp.where(others, cos, jnp.inf), axis=1)
    lowest = jnp.where(jnp.isfinite(lowest), lowest, 0.0)
    n = members.sum()
    dns = jnp.sum(jnp.where(members, 1.0 - lowest, 0.0)) / jnp.maximum(n, 1)
    return n / k * dns


def lfighter(*, kmeans_iters: int, mode: str) -> Defense:
    """Cluster the output-layer changes of the two classes with the largest total magnitude
    into 2 with k-means; flag the cluster that is smaller and/or denser, i.e. has the lower
    size-weighted inverse density (Jebreel et al., "LFighter", Neural Networks 2024)."""

    def apply(view, memory):
        rows = view.head_rows  # [k, C, F]
        k = rows.shape[0]
        magnitude = jnp.sum(row_norms(rows), axis=0)  # [C]
        _, top2 = jax.lax.top_k(magnitude, 2)
        data = rows[:, top2, :].reshape(k, -1)  # [k, 2F]
        valid = jnp.ones((k,), bool)
        start = farthest_pair(data, valid)
        in1 = two_means(data, valid, start, kmeans_iters)
        cos = cosine_matrix(data)
        score0, score1 = _inverse_density(cos, ~in1), _inverse_density(cos, in1)
        bad_is_1 = ~(score0 < score1)
        both = jnp.any(in1) & jnp.any(~in1)
        flags = both & (in1 == bad_is_1)
        d0 = row_norms(data - masked_mean(data, ~in1, start[0])[None, :])  # distance to each center
        d1 = row_norms(data - masked_mean(data, in1, start[1])[None, :])
        scores = jnp.where(bad_is_1, d0 - d1, d1 - d0)
        aggregate = weighted_mean(view.updates, (~flags).astype(jnp.float32))
        return flagging_verdict(view.updates, flags, scores, mode, aggregate), memory

    return Defense(no_memory, apply, needs_root=False, flags_clients=True)
