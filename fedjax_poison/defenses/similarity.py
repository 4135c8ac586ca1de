"""Rules that judge clients by the direction of their updates: FoolsGold, FLTrust, LFighter.

All three flag clients. mode 'detect': flags reported, aggregate = plain FedAvg;
mode 'filter': the rule's own aggregate. Only the valid rows (`RoundView.valid`) take part,
in the aggregate as in the rule's memory.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fedjax_poison.defenses.base import (
    Defense,
    cosine_matrix,
    flagging_verdict,
    no_memory,
    require,
    require_mode,
    require_two_clients,
    weighted_mean,
)
from fedjax_poison.defenses.cluster import farthest_pair, masked_mean, two_means
from fedjax_poison.defenses.numeric import clean, norms, rescale, scale_of


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


# FoolsGold's memory beyond which the factory refuses the federation (history + N x N cosines).
FOOLSGOLD_MAX_BYTES = 4 * 2**30


def foolsgold_bytes(num_clients: int, num_classes: int, head_features: int) -> int:
    """Bytes of FoolsGold's history [N, C*F] and its pairwise cosines [N, N] (float32)."""
    return 4 * num_clients * (num_classes * head_features + num_clients)


def foolsgold(*, num_clients: int, num_classes: int, head_features: int, mode: str) -> Defense:
    """Down-weight clients whose summed updates point the same way (Fung et al., RAID 2020).

    Memory: each client's summed output-layer change [N, C*F] (not the full update, so the
    memory stays O(N*C*F); the output layer is where FoolsGold's paper and LFighter's code
    look); an invalid row adds nothing. Weight 0 = flagged.

    When it degenerates: a client keeps weight only if its (pardoned) largest cosine with
    another client's history is below about 0.62 (the logit with confidence 1 cuts weights
    below 0.377, and clients not yet seen, with weight 1, fix the rescaling). Honest IID
    clients' histories all point along the common gradient, so with few attackers, or none,
    FoolsGold often zeroes every client of a round: the model does not move and the round
    counts in `degenerate_rounds` (30% label flipping, k=5: every round).
    """
    require_mode(mode)
    memory = foolsgold_bytes(num_clients, num_classes, head_features)
    if memory > FOOLSGOLD_MAX_BYTES:
        raise ValueError(
            f"FoolsGold keeps every client's output-layer history and compares all pairs: "
            f"for N={num_clients} clients that is {memory / 2**30:.1f} GiB "
            f"(at most {FOOLSGOLD_MAX_BYTES / 2**30:.0f} GiB); use fewer clients"
        )

    def init():
        return jnp.zeros((num_clients, num_classes * head_features), jnp.float32)

    def apply(view, history):
        valid, updates = clean(view)
        k = view.client_ids.shape[0]
        rows = jnp.where(valid[:, None], view.head_rows.reshape(k, -1), 0.0)
        history = history.at[view.client_ids].add(rows)
        wv, maxcs = foolsgold_weights(history)
        share = jnp.where(valid, wv[view.client_ids], 0.0)
        aggregate = weighted_mean(updates, share)
        scores = maxcs[view.client_ids]
        verdict = flagging_verdict(updates, share <= 0, scores, mode, aggregate, valid=valid)
        return verdict, history

    return Defense(init, apply, root_size=0, flags_clients=True)


def fltrust(*, mode: str, root_size: int = 100) -> Defense:
    """Trust = ReLU(cosine with the server's root update); updates rescaled to the root's
    norm, averaged by trust (Cao et al., NDSS 2021). Zero trust = flagged. The root update
    is the server's own training on a clean root set of `root_size` examples."""
    require(root_size >= 1, "root_size", ">= 1", root_size)
    require_mode(mode)

    def apply(view, memory):
        valid, updates = clean(view)
        root = view.root_update
        size, root_norm = norms(updates), norms(root[None, :])[0]
        unit = updates / jnp.maximum(size, 1e-30)[:, None]
        cos = jnp.where(valid, unit @ (root / jnp.maximum(root_norm, 1e-30)), 0.0)
        trust = jnp.where(valid, jax.nn.relu(cos), 0.0)
        delta, weights = weighted_mean(unit * root_norm, trust)
        flags = trust <= 0
        verdict = flagging_verdict(updates, flags, -cos, mode, (delta, weights), valid=valid)
        return verdict, memory

    return Defense(no_memory, apply, root_size=root_size, flags_clients=True)


def _inverse_density(cos: jax.Array, members: jax.Array, n_valid: jax.Array) -> jax.Array:
    """LFighter's size-weighted inverse density of one cluster: n/k * mean_i (1 - min_j cos_ij)
    over members i and other members j (a lone member's min is taken as 0, as in its code);
    k counts the valid rows."""
    k = cos.shape[0]
    others = members[None, :] & ~jnp.eye(k, dtype=bool)
    lowest = jnp.min(jnp.where(others, cos, jnp.inf), axis=1)
    lowest = jnp.where(jnp.isfinite(lowest), lowest, 0.0)
    n = members.sum()
    dns = jnp.sum(jnp.where(members, 1.0 - lowest, 0.0)) / jnp.maximum(n, 1)
    return n / jnp.maximum(n_valid, 1) * dns


def lfighter(*, clients_per_round: int, mode: str, kmeans_iters: int = 20) -> Defense:
    """Cluster the output-layer changes of the two classes with the largest total magnitude
    into 2 with k-means; flag the cluster that is smaller and/or denser, i.e. has the lower
    size-weighted inverse density (Jebreel et al., "LFighter", Neural Networks 2024).
    k-means runs on the valid rows scaled by a power of two (it commutes with scaling).

    When the two densities tie, nobody is flagged (scores 0): the clusters cannot be told
    apart, and the paper's rule would flag one by its position. Two valid clients always
    tie (each is a cluster alone)."""
    require(kmeans_iters >= 1, "kmeans_iters", ">= 1", kmeans_iters)
    require_two_clients(clients_per_round)
    require_mode(mode)

    def apply(view, memory):
        valid, updates = clean(view)
        k = updates.shape[0]
        rows = jnp.where(valid[:, None, None], view.head_rows, 0.0)  # [k, C, F]
        magnitude = jnp.sum(norms(rows), axis=0)  # [C]
        _, top2 = jax.lax.top_k(magnitude, 2)
        data = rows[:, top2, :].reshape(k, -1)  # [k, 2F]
        s = scale_of(data, valid)
        data = data / s
        start = farthest_pair(data, valid)
        in1 = two_means(data, valid, start, kmeans_iters) & valid
        out1 = ~in1 & valid
        cos = cosine_matrix(data)
        n = valid.sum()
        score0, score1 = _inverse_density(cos, out1, n), _inverse_density(cos, in1, n)
        bad_is_1 = ~(score0 < score1)
        apart = jnp.any(in1) & jnp.any(out1) & (score0 != score1)  # a tie: nothing to tell
        flags = apart & valid & (in1 == bad_is_1)
        d0 = norms(data - masked_mean(data, out1, start[0])[None, :])  # distance to each center
        d1 = norms(data - masked_mean(data, in1, start[1])[None, :])
        scores = jnp.where(apart, rescale(jnp.where(bad_is_1, d0 - d1, d1 - d0), s), 0.0)
        aggregate = weighted_mean(updates, (valid & ~flags).astype(jnp.float32))
        verdict = flagging_verdict(updates, flags, scores, mode, aggregate, valid=valid)
        return verdict, memory

    return Defense(no_memory, apply, root_size=0, flags_clients=True)
