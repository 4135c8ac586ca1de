"""The paper's defense, made automatic: PCA of the source-class output rows, two clusters,
and a verdict per client (Tolpegin et al., ESORICS 2020, Section 7).

Each round adds the k selected clients' changes of the source class's output row to a
window of the last W rounds (a ring buffer in memory). Each row is first divided by its
client's whole-update norm (`row_scale='update'`): the learning rate of a round scales
every row of that round alike, while label flipping barely changes the whole update's
norm, so rows of different rounds become comparable and the flip's effect on the row's
size is kept. Over the window: standardize each coordinate, project to 2 dimensions
(PCA), split into two clusters with k-means. The window is judged from the first rounds
on, over the rows it holds so far (5 rows in round 2, 10 in round 3, ...).

Which cluster is malicious is decided by what label flipping does, not by size (with 25
of 50 clients malicious the malicious cluster was larger or tied on Fashion-MNIST). A
malicious client has no example labelled with the source class, so its source row only
loses the evidence `sum_i (1 - p_s(x_i)) h_i` of source examples that honest rows gain:
it moves against what the federation has learned of the source row. That learned part is
the global row minus its value as round 1 found it (the initialization; zeros if the
defense never saw round 1, which leaves the global row itself), and each row's sign is its
cosine with it, recomputed every round for every row of the window. Not the global row itself: early
on it is mostly its random initialization, and on the real files (Fashion-MNIST, flip
6 -> 0) its cosines misled in the first rounds: in round 1 honest rows had -0.07 to
-0.10, the attacker -0.01; in round 2 at 50% attackers (round 1's mean was 4 attackers'
of 5, and the row had barely left its initialization) honest rows had -0.05 to -0.08, the
attacker +0.07. With the learned part, from round 3 on, attackers had -0.26 to -0.05 and
honest rows -0.02 to +0.59 (30% and 50%), and old rows of the window, signed again
against the newer reference, fall on their side too. In round 1 nothing has been
learned: its rows are neither judged nor kept.

The cluster with the lower mean sign is the malicious one; a row in it is flagged when
its own sign is negative and below the midpoint of the two clusters' means, so an honest
row that k-means put there keeps its own verdict. k-means starts from the rows of lowest
and highest sign: with 3 attackers among 15 rows in round 4, a start from the ends of PC1
put 2 honest rows with them. The clusters must be apart, otherwise nobody is flagged:
the malicious cluster's mean sign must be negative (a row moving against the learned
row), and the gap between the two means, in pooled within-cluster standard deviations,
must reach `min_separation`. A window of a few rows splits by chance or by round (gaps up
to 10 with 5 rows and no attacker), but its clusters all agree with the learned row. With
no attacker over 100 rounds nobody was flagged, source known or unknown: the source
class's lower cluster kept a positive mean (+0.03 at the least); other classes' went
below zero late in the run (to -0.08), with gaps of at most 2.5 there.

Measured over 30 rounds on the real files, every round counted (the first included),
source class known / unknown: precision 1.00 / 1.00 and recall 0.95 / 0.97 at 30%
attackers, 1.00 / 1.00 and 0.93 / 0.93 at 50%, no flag with no attacker. The misses are
round 1 (nothing learned yet), round 2 at 50% (the reference is the attackers' own) and
a lone attacker in round 3 (10 rows, split by round). benchmarks/pca_detection.py and
docs/pca_detection.md hold the table.

With the source class unknown (-1) the same is done for every class's row, each with its
own class's learned row, and the class with the largest gap is taken. The target row of
an attacker gains the evidence its source row lost, and the learned target row pushes
source-like images away, so the target class can show the flip too (it did in rounds 3
and 3 at 30%).

Modes: 'detect' reports flags and aggregates with FedAvg; 'filter' drops flagged clients
from the mean; 'block' also sets `block` once a client has been flagged `block_after` times.
Before `start_round` nobody is flagged (the rows still enter the window). A row the
server marks invalid (`RoundView.valid` False: its update was not finite), or whose norm
is not finite when the rule is called without the server, never enters the window, has no
weight and is never flagged by this rule; a round without a valid row leaves the window as
it was.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from fedjax_poison.defenses.base import (
    Defense,
    RoundView,
    make_verdict,
    require,
    require_two_clients,
    row_norms,
    weighted_mean,
)
from fedjax_poison.defenses.cluster import masked_mean, silhouette, two_means
from fedjax_poison.defenses.numeric import clean

ROW_SCALES = ("update", "row", "none")
ORIENTS = ("learned", "gained")


class PCAMemory(NamedTuple):
    rows: jax.Array  # [W*k, R, F] float32, feature rows of the last W rounds (R = 1 or C)
    ids: jax.Array  # [W*k] int32, the client of each row
    valid: jax.Array  # [W*k] bool, the slot holds a row
    slot: jax.Array  # [] int32, ring position (in rounds) the next round writes
    flag_counts: jax.Array  # [N] int32, how many times each client was flagged
    origin: jax.Array  # [R, F] float32, the global rows of the first round (zeros if not seen)


def features(view: RoundView, source_class: int, row_scale: str):
    """This round's rows [k, R, F] (scaled as `row_scale` says) and the global model's rows
    [R, F] of the same classes (R = 1 with a known source class, else C)."""
    rows = view.head_rows.astype(jnp.float32)  # [k, C, F]
    heads = view.global_head.astype(jnp.float32)  # [C, F]
    if source_class >= 0:
        rows = rows[:, source_class : source_class + 1]
        heads = heads[source_class : source_class + 1]
    if row_scale == "update":  # the lr of a round scales every row alike; the flip does not
        norms = row_norms(view.updates)[:, None, None]
    elif row_scale == "row":
        norms = row_norms(rows)[..., None]
    else:
        return rows, heads
    return rows / jnp.where(norms > 0, norms, 1.0), heads


def signs(rows: jax.Array, learned: jax.Array) -> jax.Array:
    """Cosine of each row [M, R, F] with the learned part of its class's row [R, F] ->
    [M, R]; 0 where either is zero."""
    denom = row_norms(rows) * row_norms(learned)[None, :]
    dots = jnp.sum(rows * learned[None], axis=-1)
    return jnp.where(denom > 0, dots / jnp.where(denom > 0, denom, 1.0), 0.0)


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


def cluster_rows(x: jax.Array, valid: jax.Array, iters: int, sign: jax.Array | None = None):
    """Embed x [M, F] and split it in two -> (points [M, 2], in1 [M] bool, silhouette []).

    k-means starts from the two ends of PC1, or, given each row's sign [M], from the rows
    of lowest and highest sign. The silhouette is for reports only: on real rows it is
    about as high without an attack as with one, so the verdict uses the sign gap of
    `judge` instead."""
    points = embed(x, valid)
    key = points[:, 0] if sign is None else sign
    lo = jnp.argmin(jnp.where(valid, key, jnp.inf))
    hi = jnp.argmax(jnp.where(valid, key, -jnp.inf))
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
    0 if a cluster is empty or the lower mean is not negative, scores [M]: position along
    the line from the honest to the malicious center in the PCA plane, 0 at the midpoint).
    """
    mean0, var0 = _mean_var(sign, valid & ~in1)
    mean1, var1 = _mean_var(sign, valid & in1)
    n0, n1 = (valid & ~in1).sum(), (valid & in1).sum()
    pooled = (n0 * var0 + n1 * var1) / jnp.maximum(n0 + n1, 1)
    gap = jnp.abs(mean0 - mean1) / jnp.sqrt(pooled + 1e-6)  # signs are cosines, in [-1, 1]
    contrary = jnp.minimum(mean0, mean1) < 0  # the lower cluster moves against the reference
    gap = jnp.where((n0 > 0) & (n1 > 0) & contrary, gap, 0.0)
    cluster = in1 == (mean1 < mean0)
    malicious = valid & cluster & (sign < jnp.minimum((mean0 + mean1) / 2, 0.0))
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
        ids=jnp.zeros((m,), jnp.int32),
        valid=jnp.zeros((m,), bool),
        slot=jnp.zeros((), jnp.int32),
        flag_counts=jnp.zeros((num_clients,), jnp.int32),
        origin=jnp.zeros((num_rows, head_features), jnp.float32),
    )


def _remember(memory: PCAMemory, rows, ids, enter, window: int) -> tuple[PCAMemory, jax.Array]:
    """Write this round's rows [k, R, F] at the ring slot, valid where `enter` [k] ->
    (memory, their row indices [k]). A round where no row enters changes nothing."""
    k = ids.shape[0]
    start = memory.slot * k
    new = memory._replace(
        rows=lax.dynamic_update_slice(memory.rows, rows, (start, 0, 0)),
        ids=lax.dynamic_update_slice(memory.ids, ids.astype(jnp.int32), (start,)),
        valid=lax.dynamic_update_slice(memory.valid, enter, (start,)),
        slot=(memory.slot + 1) % window,
    )
    any_row = enter.any()
    return jax.tree.map(lambda a, b: jnp.where(any_row, a, b), new, memory), start + jnp.arange(k)


def pca(
    *,
    mode: str,
    num_clients: int,
    clients_per_round: int,
    num_classes: int,
    head_features: int,
    source_class: int = -1,
    window: int = 10,
    start_round: int = 1,
    min_separation: float = 3.0,
    kmeans_iters: int = 20,
    row_scale: str = "update",
    orient: str = "learned",
    block_after: int = 3,
) -> Defense:
    """The paper's PCA defense (Tolpegin et al., ESORICS 2020) with an automatic verdict
    (see the module docstring).

    source_class: the attacked class if the server knows it; -1: the best separated one.
    window: rounds of rows clustered together (window * k rows). start_round: flags from
    this round on (from 1; the paper's offline analysis used its code's rounds 10..199
    counted from 0, i.e. 11). min_separation: the gap between the two clusters' mean signs
    (cosine with the learned part of the global row), in pooled within-cluster standard
    deviations, needed to flag anyone; the lower cluster's mean sign must also be negative
    (measured on Fashion-MNIST: at most 2.5 with no attacker, 3.1 to 10 with 30-50%,
    docs/pca_detection.md). kmeans_iters: Lloyd iterations. row_scale: rows of different
    rounds differ in scale (lr schedule): 'update' divides each row by its client's
    whole-update norm, which the flip barely moves; 'row': unit rows; 'none'. orient: what
    signs a row: 'learned', its cosine with the learned part of the global row (any model);
    'gained', with that part's positive coordinates only, for a head whose inputs are >= 0
    (after a ReLU): a flipper's source row then loses in every coordinate, so what was
    gained came from honest rows, whoever dominated the first rounds. block_after:
    mode 'block' excludes a client once it was flagged this many times.
    """
    need = f"in [0, {num_classes}) or -1 (unknown)"
    require(-1 <= source_class < num_classes, "source_class", need, source_class)
    for field, value in (("window", window), ("kmeans_iters", kmeans_iters)):
        require(value >= 1, field, ">= 1", value)
    require(block_after >= 1, "block_after", ">= 1", block_after)
    require(start_round >= 1, "start_round", ">= 1 (a round number)", start_round)
    ok = 0 <= min_separation < float("inf")
    require(ok, "min_separation", "a finite number >= 0", min_separation)
    require(row_scale in ROW_SCALES, "row_scale", f"one of {list(ROW_SCALES)}", row_scale)
    require(orient in ORIENTS, "orient", f"one of {list(ORIENTS)}", orient)
    require_two_clients(clients_per_round)
    num_rows = 1 if source_class >= 0 else num_classes
    verdicts = jax.vmap(judge, in_axes=(0, 0, None, 1))

    def cluster(rows, valid, sign):
        """cluster_rows for each of the R classes: rows [M, R, F], sign [M, R] -> [R, ...].

        One class after the other: vmapped over them, a run on 2 CPU devices hung (jax 0.10.2,
        with the source class unknown; the same with the rule before rows were re-signed)."""
        one = lambda xs: cluster_rows(xs[0], valid, kmeans_iters, xs[1])
        return lax.map(one, (jnp.swapaxes(rows, 0, 1), sign.T))

    def init() -> PCAMemory:
        return _init_memory(window, clients_per_round, num_rows, head_features, num_clients)

    def apply(view: RoundView, memory: PCAMemory):
        sent, updates = clean(view)  # [k] bool: the update was valid and its norm finite
        heads_sent = jnp.where(sent[:, None, None], view.head_rows, 0.0)
        view = view._replace(updates=updates, head_rows=heads_sent, valid=sent)
        rows, heads = features(view, source_class, row_scale)  # [k, R, F], [R, F]
        first = view.round == 0  # the global model is the initialization
        origin = jnp.where(first, heads, memory.origin)
        learned = heads - origin  # [R, F], zero in the first round
        if orient == "gained":  # a flipper's row only loses where the head's inputs are >= 0
            learned = jnp.maximum(learned, 0.0)
        enter = sent & ~first  # [k]
        memory, now = _remember(memory, rows, view.client_ids, enter, window)
        sign = signs(memory.rows, learned)  # [M, R]
        points, in1, _ = cluster(memory.rows, memory.valid, sign)  # [R, M, 2], [R, M]
        malicious, gap, scores = verdicts(points, in1, memory.valid, sign)  # [R, M], [R]
        best = jnp.argmax(gap)  # with the source unknown: the class that splits clearest
        separated = (gap[best] >= min_separation) & (view.round + 1 >= start_round)
        flags = malicious[best][now] & separated & enter  # [k]
        scores = jnp.where(enter, scores[best][now], 0.0)
        counts = memory.flag_counts.at[view.client_ids].add(flags.astype(jnp.int32))
        block = counts[view.client_ids] >= block_after if mode == "block" else None
        keep = sent if mode == "detect" else sent & ~flags
        delta, weights = weighted_mean(view.updates, keep.astype(jnp.float32))
        verdict = make_verdict(delta, weights, flags=flags, scores=scores, block=block)
        memory = memory._replace(flag_counts=counts, origin=origin)
        return verdict, memory

    return Defense(init, apply, root_size=0, flags_clients=True)
