"""The paper's defense, made automatic: PCA of the source-class output rows, two clusters,
and a verdict per client (Tolpegin et al., ESORICS 2020, Section 7).

Each round adds the k selected clients' changes of the source class's output row to a
window of the last W rounds (a ring buffer in memory). Each row is first divided by its
client's whole-update norm (`row_scale='update'`): the learning rate of a round scales
every row of that round alike, while label flipping barely changes the whole update's
norm, so rows of different rounds become comparable and the flip's effect on the row's
size is kept. Over the window: standardize each coordinate, project to 2 dimensions
(PCA), split into two clusters with k-means started from the two ends of PC1.

Which cluster is malicious is decided by what label flipping does, not by size (with 25
of 50 clients malicious the malicious cluster was larger or tied on Fashion-MNIST). A
malicious client has no example labelled with the source class, so its source row only
loses the evidence `sum_i (1 - p_s(x_i)) h_i` of source examples that honest rows gain:
it moves against the global source row, which points toward the source images' features.
Each row's sign is its cosine with the global row of its class at its round (on
Fashion-MNIST with 30% attackers: about -0.15 for attackers, +0.15 for honest clients,
also with the model under attack). The cluster with the lower mean sign is the
malicious one; a row in it is flagged when its own sign is negative and below the
midpoint of the two clusters' means, so an honest row that k-means put there keeps its
own verdict. The clusters must be apart, otherwise nobody is flagged: the gap between
their mean signs, in pooled within-cluster standard deviations, must reach
`min_separation` (measured on Fashion-MNIST windows: at most 0.8 with no attacker,
median 5 with 10 to 50% attackers).

With the source class unknown (-1) the same is done for every class's row, each with its
own class's sign, and the class with the largest gap is taken (on Fashion-MNIST the
source class in every round where anyone was flagged; a target row moves the other way
and by less; with no attacker the largest of C gaps was at most 1.6).

Modes: 'detect' reports flags and aggregates with FedAvg; 'filter' drops flagged clients
from the mean; 'block' also sets `block` once a client has been flagged `block_after` times.
Before `start_round` nobody is flagged (the rows still enter the window).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from fedjax_poison.defenses.base import (
    Defense,
    RoundView,
    flagging_verdict,
    row_norms,
    weighted_mean,
)
from fedjax_poison.defenses.cluster import masked_mean, silhouette, two_means

ROW_SCALES = ("update", "row", "none")


class PCAMemory(NamedTuple):
    rows: jax.Array  # [W*k, R, F] float32, feature rows of the last W rounds (R = 1 or C)
    sign: jax.Array  # [W*k, R] float32, each row's cosine with the global row of its round
    ids: jax.Array  # [W*k] int32, the client of each row
    valid: jax.Array  # [W*k] bool, the slot holds a row
    slot: jax.Array  # [] int32, ring position (in rounds) the next round writes
    flag_counts: jax.Array  # [N] int32, how many times each client was flagged


def features(view: RoundView, source_class: int, row_scale: str):
    """This round's rows [k, R, F] and their signs [k, R]: each row's cosine with the
    global model's row of the same class (R = 1 with a known source class, else C)."""
    rows = view.head_rows.astype(jnp.float32)  # [k, C, F]
    heads = view.global_head.astype(jnp.float32)  # [C, F]
    if source_class >= 0:
        rows = rows[:, source_class : source_class + 1]
        heads = heads[source_class : source_class + 1]
    denom = row_norms(rows) * row_norms(heads)[None, :]
    sign = jnp.sum(rows * heads[None], axis=-1) / jnp.maximum(denom, 1e-30)
    if row_scale == "update":  # the lr of a round scales every row alike; the flip does not
        norms = row_norms(view.updates)[:, None, None]
    elif row_scale == "row":
        norms = row_norms(rows)[..., None]
    else:
        return rows, sign
    return rows / jnp.where(norms > 0, norms, 1.0), sign


def embed(x: jax.Array, valid: jax.Array) -> jax.Array:
    """Standardize each coordinate over the valid rows of x [M, F], PCA to 2 -> [M, 2].

    Masked rows are zeroed and so sit at the origin (the valid rows' mean)."""
    n = jnp.maximum(valid.sum(), 1)
    mean = jnp.sum(jnp.where(valid[:, None], x, 0.0), axis=0) / n
    centered = jnp.where(valid[:, None], x - mean[None, :], 0.0)
    std = jnp.sqrt(jnp.sum(centered * centered, axis=0) / n)
    scale = jnp.where(std > 1e-6 * jnp.abs(mean) + 1e-30, std, 1.0)  # constant -> unscaled
    z = centered / scale[None, :]
    # The SVD's U S from the Gram matrix [M, M]: M (rows of a window) << F (features).
    eigval, eigvec = jnp.linalg.eigh(z @ z.T)  # ascending
    top = jnp.sqrt(jnp.maximum(eigval[::-1][:2], 0.0))
    return eigvec[:, ::-1][:, :2] * top[None, :]


def cluster_rows(x: jax.Array, valid: jax.Array, iters: int):
    """Embed x [M, F] and split it in two -> (points [M, 2], in1 [M] bool, silhouette []).

    The silhouette is for reports only: on real rows it is about as high without an
    attack as with one, so the verdict uses the sign gap of `judge` instead."""
    points = embed(x, valid)
    pc1 = points[:, 0]
    lo = jnp.argmin(jnp.where(valid, pc1, jnp.inf))
    hi = jnp.argmax(jnp.where(valid, pc1, -jnp.inf))
    in1 = two_means(points, valid, jnp.stack([points[lo], points[hi]]), iters)
    return points, in1, silhouette(points, valid, in1)


def _mean_var(x: jax.Array, mask: jax.Array):
    n = jnp.maximum(mask.sum(), 1)
    mean = jnp.sum(jnp.where(mask, x, 0.0)) / n
    return mean, jnp.sum(jnp.where(mask, (x - mean) ** 2, 0.0)) / n


def judge(points, in1, valid, sign):
    """Which rows of a 2-clustering are malicious, and how clearly.

    The malicious cluster is the one with the lower mean sign; a row in it is flagged when
    its own sign is negative and below the midpoint of the two clusters' means (an honest
    row that k-means put there keeps its own sign). Returns (malicious [M] bool, gap []: the
    difference of the clusters' mean signs in pooled within-cluster standard deviations,
    0 if a cluster is empty, scores [M]: position along the line from the honest to the
    malicious center in the PCA plane, 0 at the midpoint).
    """
    mean0, var0 = _mean_var(sign, valid & ~in1)
    mean1, var1 = _mean_var(sign, valid & in1)
    n0, n1 = (valid & ~in1).sum(), (valid & in1).sum()
    pooled = (n0 * var0 + n1 * var1) / jnp.maximum(n0 + n1, 1)
    gap = jnp.abs(mean0 - mean1) / jnp.sqrt(pooled + 1e-6)  # signs are cosines, in [-1, 1]
    gap = jnp.where((n0 > 0) & (n1 > 0), gap, 0.0)
    cluster = in1 == (mean1 < mean0)
    malicious = cluster & (sign < jnp.minimum((mean0 + mean1) / 2, 0.0))
    c_bad = masked_mean(points, valid & cluster, jnp.zeros(2))
    c_good = masked_mean(points, valid & ~cluster, jnp.zeros(2))
    axis = c_bad - c_good
    axis = axis / jnp.maximum(jnp.sqrt(jnp.sum(axis * axis)), 1e-30)
    scores = (points - (c_bad + c_good)[None, :] / 2) @ axis
    return malicious, gap, scores


def _init_memory(window, k, num_rows, head_features, num_clients) -> PCAMemory:
    m = window * k
    return PCAMemory(
        rows=jnp.zeros((m, num_rows, head_features), jnp.float32),
        sign=jnp.zeros((m, num_rows), jnp.float32),
        ids=jnp.zeros((m,), jnp.int32),
        valid=jnp.zeros((m,), bool),
        slot=jnp.zeros((), jnp.int32),
        flag_counts=jnp.zeros((num_clients,), jnp.int32),
    )


def _remember(memory: PCAMemory, rows, sign, ids, window: int) -> tuple[PCAMemory, jax.Array]:
    """Write this round's rows at the ring slot -> (memory, their row indices [k])."""
    k = ids.shape[0]
    start = memory.slot * k
    new = memory._replace(
        rows=lax.dynamic_update_slice(memory.rows, rows, (start, 0, 0)),
        sign=lax.dynamic_update_slice(memory.sign, sign, (start, 0)),
        ids=lax.dynamic_update_slice(memory.ids, ids.astype(jnp.int32), (start,)),
        valid=lax.dynamic_update_slice(memory.valid, jnp.ones((k,), bool), (start,)),
        slot=(memory.slot + 1) % window,
    )
    return new, start + jnp.arange(k)


def pca(
    *,
    source_class: int,
    window: int,
    start_round: int,
    min_separation: float,
    kmeans_iters: int,
    row_scale: str,
    block_after: int,
    mode: str,
    num_clients: int,
    clients_per_round: int,
    num_classes: int,
    head_features: int,
) -> Defense:
    """The paper's PCA defense with an automatic verdict (see the module docstring)."""
    num_rows = 1 if source_class >= 0 else num_classes

    def init() -> PCAMemory:
        return _init_memory(window, clients_per_round, num_rows, head_features, num_clients)

    def apply(view: RoundView, memory: PCAMemory):
        rows, sign = features(view, source_class, row_scale)
        memory, now = _remember(memory, rows, sign, view.client_ids, window)
        points, in1, _ = jax.vmap(cluster_rows, in_axes=(1, None, None))(
            memory.rows, memory.valid, kmeans_iters
        )  # [R, M, 2], [R, M]
        malicious, gap, scores = jax.vmap(judge, in_axes=(0, 0, None, 1))(
            points, in1, memory.valid, memory.sign
        )  # [R, M], [R], [R, M]
        best = jnp.argmax(gap)  # with the source unknown: the class that splits clearest
        separated = (gap[best] >= min_separation) & (view.round >= start_round)
        flags = malicious[best][now] & separated
        counts = memory.flag_counts.at[view.client_ids].add(flags.astype(jnp.int32))
        block = counts[view.client_ids] >= block_after if mode == "block" else None
        aggregate = weighted_mean(view.updates, (~flags).astype(jnp.float32))
        verdict = flagging_verdict(view.updates, flags, scores[best][now], mode, aggregate, block)
        return verdict, memory._replace(flag_counts=counts)

    return Defense(init, apply, needs_root=False, flags_clients=True)
