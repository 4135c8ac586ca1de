"""The paper's defense, made automatic: PCA of the source-class output rows, two clusters,
and a verdict per client (Tolpegin et al., ESORICS 2020, Section 7).

Each round adds the k selected clients' changes of the source class's output row to a
window of the last W rounds (a ring buffer in memory). Each row is first divided by its
client's whole-update norm (`row_scale='update'`): the learning rate of a round scales
every row of that round alike, while label flipping barely changes the whole update's
norm, so rows of different rounds become comparable and the flip's effect on the row's
size is kept. Over the window: standardize each coordinate, project to 2 dimensions
(PCA), split into two clusters with k-means started from the two ends of PC1. The
clusters must be separated (mean silhouette >= `min_separation`), otherwise nobody is
flagged.

Which cluster is malicious is decided by what label flipping does, not by size (with 25
of 50 clients malicious the malicious cluster was larger or tied on Fashion-MNIST). A
malicious client trains on no example of the source class, so its source row lacks the
positive evidence `sum_i (1 - p_s(x_i)) h_i` over source examples that honest rows carry
and moves against the global source row, which points toward the source examples'
features. Each row's sign is its cosine with the global source row of its round; the
cluster with the lower mean sign is the malicious one, and a row in it is flagged when
its own sign is below the midpoint of the two clusters' means (an honest outlier that
k-means put there keeps its honest sign). This needs the global model to still point
its source row toward source images, which holds until an attack has taken it over.

With the source class unknown (-1) every class's row is clustered and the best separated
class (highest silhouette) is taken, as LFighter does. That class may be the target,
whose malicious rows move the other way, so the sign is then the cosine of a client's
whole head change with the global head: a flipped example adds evidence for a class the
model ranks below the true one. This is right while the global model still ranks the
source class first on source images: with a majority of attackers and no filtering
(mode 'detect') the model is taken over and the verdicts invert; give the source class
then.

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
    sign: jax.Array  # [W*k] float32, cosine of each row with the global head of its round
    ids: jax.Array  # [W*k] int32, the client of each row
    valid: jax.Array  # [W*k] bool, the slot holds a row
    slot: jax.Array  # [] int32, ring position (in rounds) the next round writes
    flag_counts: jax.Array  # [N] int32, how many times each client was flagged


def _cosine(a: jax.Array, b: jax.Array) -> jax.Array:
    """Cosine of each row of a [k, p] with b [p] -> [k]."""
    denom = row_norms(a) * jnp.sqrt(jnp.sum(b * b))
    return (a @ b) / jnp.maximum(denom, 1e-30)


def features(view: RoundView, source_class: int, row_scale: str):
    """This round's rows [k, R, F] (R = 1 with a known source, else C) and signs [k]."""
    rows = view.head_rows.astype(jnp.float32)  # [k, C, F]
    k = rows.shape[0]
    if source_class >= 0:
        sign = _cosine(rows[:, source_class], view.global_head[source_class])
        rows = rows[:, source_class : source_class + 1]
    else:
        sign = _cosine(rows.reshape(k, -1), view.global_head.reshape(-1))
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
    """Embed x [M, F] and split it in two -> (points [M, 2], in1 [M] bool, silhouette [])."""
    points = embed(x, valid)
    pc1 = points[:, 0]
    lo = jnp.argmin(jnp.where(valid, pc1, jnp.inf))
    hi = jnp.argmax(jnp.where(valid, pc1, -jnp.inf))
    in1 = two_means(points, valid, jnp.stack([points[lo], points[hi]]), iters)
    return points, in1, silhouette(points, valid, in1)


def judge(points, in1, valid, sign):
    """Which rows are malicious: those in the cluster with the lower mean sign whose own sign
    is below the midpoint of the two clusters' mean signs (an honest outlier that k-means
    put with the malicious cluster keeps its honest sign).

    Returns (malicious [M] bool, ordered [] bool: two clusters whose mean signs differ,
    scores [M]: position along the line from the honest to the malicious center, 0 at the
    midpoint).
    """
    mean0 = masked_mean(sign[:, None], valid & ~in1, jnp.zeros(1))[0]
    mean1 = masked_mean(sign[:, None], valid & in1, jnp.zeros(1))[0]
    bad_is_1 = mean1 < mean0
    cluster = in1 == bad_is_1
    malicious = cluster & (sign < (mean0 + mean1) / 2)
    c_bad = masked_mean(points, valid & cluster, jnp.zeros(2))
    c_good = masked_mean(points, valid & ~cluster, jnp.zeros(2))
    axis = c_bad - c_good
    axis = axis / jnp.maximum(jnp.sqrt(jnp.sum(axis * axis)), 1e-30)
    scores = (points - (c_bad + c_good)[None, :] / 2) @ axis
    both = jnp.any(valid & in1) & jnp.any(valid & ~in1)
    return malicious, both & (mean0 != mean1), scores


def _init_memory(window, k, num_rows, head_features, num_clients) -> PCAMemory:
    m = window * k
    return PCAMemory(
        rows=jnp.zeros((m, num_rows, head_features), jnp.float32),
        sign=jnp.zeros((m,), jnp.float32),
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
        sign=lax.dynamic_update_slice(memory.sign, sign, (start,)),
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
        points, in1, sil = jax.vmap(cluster_rows, in_axes=(1, None, None))(
            memory.rows, memory.valid, kmeans_iters
        )  # [R, M, 2], [R, M], [R]
        best = jnp.argmax(sil)
        malicious, ordered, scores = judge(points[best], in1[best], memory.valid, memory.sign)
        separated = ordered & (sil[best] >= min_separation) & (view.round >= start_round)
        flags = malicious[now] & separated
        counts = memory.flag_counts.at[view.client_ids].add(flags.astype(jnp.int32))
        block = counts[view.client_ids] >= block_after if mode == "block" else None
        aggregate = weighted_mean(view.updates, (~flags).astype(jnp.float32))
        verdict = flagging_verdict(view.updates, flags, scores[now], mode, aggregate, block)
        return verdict, memory._replace(flag_counts=counts)

    return Defense(init, apply, needs_root=False, flags_clients=True)
