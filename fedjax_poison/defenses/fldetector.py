"""FLDetector (Zhang, Fang, Cao, Lu, Gong and Zhou, KDD 2022): predict each client's update
from its previous one and the curvature seen by the server, and flag the clients whose
predictions keep missing.

The server keeps a window of the last W pairs (s, y) of the global model's change s = w_t -
w_t' and the change y = g_t - g_t' of its aggregated pseudo-gradient g = -delta between two
rounds it recorded. An L-BFGS compact form (Byrd, Nocedal and Schnabel 1994, as FLDetector's
code writes it) gives H v from them. A client i last seen at round tau, with pseudo-gradient
g_i and the global model w_tau then, is predicted as g_i + H (w_t - w_tau) (the paper's
one-round step, where every client takes part in every round); its distance to what it
sends, divided by the sum of the round's distances, enters a window of its last W
distances, whose mean is its suspicion score. The gap statistic over the round's scores
(gap.py) decides whether they hold more than one cluster; if so the upper of the two
clusters (exact 1-D 2-means) is flagged.

All of it is done on the output layer (the head rows, C*F values), not the whole update:
the server state then holds O(N C F) per-client values, never O(N d) (as FoolsGold's).
FLDetector's paper, on detection, restarts training without the flagged clients; here the
round's flagged clients are left out of its mean (mode 'filter') or only reported
('detect'), every round.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from fedjax_poison.defenses.base import (
    Defense,
    flagging_verdict,
    require,
    require_mode,
    weighted_mean,
)
from fedjax_poison.defenses.gap import gap_clusters, upper_cluster
from fedjax_poison.defenses.numeric import clean, norms, pow2

REFERENCE_STREAM = 0xF1DE7  # the gap statistic's uniform reference: a key of the round
MAX_BYTES = 4 * 2**30  # the per-client memory beyond which the factory refuses


class FLDetectorMemory(NamedTuple):
    """FLDetector's server state (p = C*F head values, W = window, N = clients)."""

    s: jax.Array  # [W, p] global head changes, oldest first (the last `pairs` rows are used)
    y: jax.Array  # [W, p] changes of the aggregated pseudo-gradient over the same rounds
    pairs: jax.Array  # [] int32 pairs held (at most W)
    head: jax.Array  # [p] the global head at the last recorded round
    grad: jax.Array  # [p] the aggregated pseudo-gradient (-delta) of that round
    started: jax.Array  # [] bool a round has been recorded
    client_grad: jax.Array  # [N, p] each client's last pseudo-gradient on the head
    client_head: jax.Array  # [N, p] the global head it was computed at
    seen: jax.Array  # [N] bool
    distances: jax.Array  # [N, W] the client's last W normalised distances, oldest first
    count: jax.Array  # [N] int32 distances recorded (the last min(count, W) are used)


def lbfgs_product(s: jax.Array, y: jax.Array, pairs: jax.Array, v: jax.Array) -> jax.Array:
    """H v [..., p] for v [..., p] from the last `pairs` rows of s, y [W, p]: the compact
    L-BFGS form sigma v - [sigma S, Y] M^-1 [sigma S^T v; Y^T v], M = [[sigma S^T S, L],
    [L^T, -D]], sigma = y^T s / s^T s of the newest pair. Unused pairs are masked out of M
    (their block is the identity). Zero where no pair is held or the result is not finite."""
    w = s.shape[0]
    use = jnp.arange(w) >= w - pairs
    scale = pow2(jnp.maximum(jnp.max(jnp.abs(s)), jnp.max(jnp.abs(y))))
    s, y = jnp.where(use[:, None], s / scale, 0.0), jnp.where(use[:, None], y / scale, 0.0)
    sy, ss = s @ y.T, s @ s.T  # [W, W]: sy[i, j] = s_i . y_j
    lower = jnp.tril(sy, -1)
    sigma = (y[-1] @ s[-1]) / jnp.where(ss[-1, -1] > 0, ss[-1, -1], 1.0)
    eye = jnp.eye(w, dtype=bool)
    both = use[:, None] & use[None, :]
    top = jnp.where(both, sigma * ss, jnp.where(eye, 1.0, 0.0))
    bottom = jnp.where(both & eye, -sy, jnp.where(eye, 1.0, 0.0))
    lower = jnp.where(both, lower, 0.0)
    m = jnp.block([[top, lower], [lower.T, bottom]])  # [2W, 2W]
    p = jnp.concatenate([sigma * (v @ s.T), v @ y.T], axis=-1)  # [..., 2W]
    solved = jnp.linalg.solve(m, p.reshape(-1, 2 * w).T).T.reshape(p.shape)
    hv = sigma * v - solved @ jnp.concatenate([sigma * s, y], axis=0)
    ok = (pairs > 0) & jnp.isfinite(hv).all() & jnp.isfinite(sigma)
    return jnp.where(ok, hv, 0.0)


def fldetector_bytes(num_clients: int, p: int, window: int) -> int:
    """Bytes of FLDetector's per-client memory (float32)."""
    return 4 * num_clients * (2 * p + window + 2)


def fldetector(
    *,
    num_clients: int,
    num_classes: int,
    head_features: int,
    mode: str,
    window: int = 10,
    gap_samples: int = 20,
    max_clusters: int = 10,
) -> Defense:
    """FLDetector on the output layer (module docstring): `window` = the paper's N, the
    pairs of the L-BFGS and the distances a score averages (10); the gap statistic draws
    `gap_samples` uniform references (20) and tries up to `max_clusters` clusters (10), as
    FLDetector's code. Predictions start with the second recorded round (one pair); a
    client is scored once it has been predicted, and only scored clients are clustered.

    Memory: FLDetectorMemory (the window and each client's last head update). Scores: the
    mean normalised distance (0 until predicted); flags: the upper cluster when the gap
    statistic finds more than one."""
    require(window >= 1, "window", ">= 1", window)
    require(gap_samples >= 2, "gap_samples", ">= 2", gap_samples)
    require(max_clusters >= 2, "max_clusters", ">= 2", max_clusters)
    require_mode(mode)
    p = num_classes * head_features
    size = fldetector_bytes(num_clients, p, window)
    if size > MAX_BYTES:
        raise ValueError(
            f"FLDetector keeps every client's last output-layer update: for N={num_clients} "
            f"clients that is {size / 2**30:.1f} GiB (at most {MAX_BYTES / 2**30:.0f} GiB); "
            "use fewer clients"
        )

    def init():
        zeros = jnp.zeros((window, p), jnp.float32)
        clients = jnp.zeros((num_clients, p), jnp.float32)
        return FLDetectorMemory(
            s=zeros,
            y=zeros,
            pairs=jnp.int32(0),
            head=jnp.zeros(p),
            grad=jnp.zeros(p),
            started=jnp.bool_(False),
            client_grad=clients,
            client_head=clients,
            seen=jnp.zeros((num_clients,), bool),
            distances=jnp.zeros((num_clients, window), jnp.float32),
            count=jnp.zeros((num_clients,), jnp.int32),
        )

    def apply(view, memory):
        valid, updates = clean(view)
        k = valid.shape[0]
        ids = view.client_ids
        grads = -jnp.where(valid[:, None], view.head_rows.reshape(k, p), 0.0)  # [k, p]
        head = view.global_head.reshape(p)
        predicted = valid & memory.seen[ids] & (memory.pairs > 0)
        step = head[None, :] - memory.client_head[ids]
        guess = memory.client_grad[ids] + lbfgs_product(memory.s, memory.y, memory.pairs, step)
        miss = jnp.where(predicted, norms(guess - grads), 0.0)
        unit = pow2(jnp.max(miss))
        miss = jnp.where(predicted, miss / unit, 0.0)
        miss = miss / jnp.where(miss.sum() > 0, miss.sum(), 1.0)  # the round's share
        rolled = jnp.concatenate([memory.distances[ids][:, 1:], miss[:, None]], axis=1)
        distances = jnp.where(predicted[:, None], rolled, memory.distances[ids])
        count = memory.count[ids] + predicted
        used = jnp.arange(window)[None, :] >= window - jnp.minimum(count, window)[:, None]
        scores = jnp.sum(jnp.where(used, distances, 0.0), axis=1) / jnp.maximum(count, 1).clip(
            max=window
        )
        scored = valid & (count > 0)
        key = jax.random.fold_in(jax.random.key(REFERENCE_STREAM), view.round)
        several = gap_clusters(scores, scored, key, gap_samples, max_clusters) >= 2
        flags = several & upper_cluster(scores, scored)
        aggregate = weighted_mean(updates, (valid & ~flags).astype(jnp.float32))
        verdict = flagging_verdict(updates, flags, scores, mode, aggregate, valid=valid)
        return verdict, record(memory, view, valid, grads, head, verdict.weights, distances, count)

    def record(memory, view, valid, grads, head, weights, distances, count):
        ids, any_valid = view.client_ids, valid.any()
        grad = weights @ grads  # the aggregate's head, as a pseudo-gradient
        push = any_valid & memory.started
        s = jnp.concatenate([memory.s[1:], (head - memory.head)[None, :]])
        y = jnp.concatenate([memory.y[1:], (grad - memory.grad)[None, :]])
        keep = lambda new, old: jnp.where(valid.reshape((-1,) + (1,) * (new.ndim - 1)), new, old)
        return FLDetectorMemory(
            s=jnp.where(push, s, memory.s),
            y=jnp.where(push, y, memory.y),
            pairs=jnp.minimum(memory.pairs + push, window),
            head=jnp.where(any_valid, head, memory.head),
            grad=jnp.where(any_valid, grad, memory.grad),
            started=memory.started | any_valid,
            client_grad=memory.client_grad.at[ids].set(keep(grads, memory.client_grad[ids])),
            client_head=memory.client_head.at[ids].set(
                keep(jnp.broadcast_to(head, grads.shape), memory.client_head[ids])
            ),
            seen=memory.seen.at[ids].set(memory.seen[ids] | valid),
            distances=memory.distances.at[ids].set(distances),
            count=memory.count.at[ids].set(count),
        )

    return Defense(init, apply, root_size=0, flags_clients=True)
