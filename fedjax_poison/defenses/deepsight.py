"""DeepSight (Rieger, Nguyen, Miettinen and Sadeghi, NDSS 2022): label each update by its
threshold exceedings, cluster the updates, reject the clusters with too many suspicious
members, clip the rest to the median norm.

From the output layer's change (head rows [C, F]) each client gets its normalised update
energies NEUP_c = e_c^2 / sum e^2, e_c = sum_f |change of w_cf| (no bias: the round view
holds the output kernel), and its threshold exceedings TE = #{c: NEUP_c > max(0.01, 1/C)
max NEUP}. A backdoor trained on one target gives few exceedings: a client with TE <= half
the round's median TE is suspicious.

Clustering, simplified where the round view or jit asks (documented in docs/defenses.md):
DeepSight clusters three ways with HDBSCAN (DDifs, NEUPs, cosine distances of the output
bias updates) and merges them by a clustering ensemble. DDifs need each local model run on
random inputs, which the round view does not hold: they are left out. The cosine distances
are of the output-layer changes. Each clustering is single linkage cut at the median
distance of a row to its nearest other row (DBSCAN with min_samples 2: HDBSCAN's hierarchy
at min_samples 1, cut at one level instead of its stability-based extraction); a row with
no neighbour that close is a cluster alone (DeepSight's outliers). Two rows share a final
cluster when they share one in both clusterings. A cluster is rejected when at least a
fraction `tau` of it is suspicious.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_poison.defenses.base import flagging_verdict, require, require_mode
from fedjax_poison.defenses.clustering import dbscan_labels, k_distance
from fedjax_poison.defenses.flame import cosine_distances
from fedjax_poison.defenses.numeric import (
    masked_mean,
    masked_median,
    norms,
    row_key,
    sq_distances,
)
from fedjax_poison.defenses.robust import stateless

NONE = np.uint32(np.iinfo(np.uint32).max)  # dbscan_labels: no cluster


def neups(heads: jax.Array) -> jax.Array:
    """[k, C] normalised update energies of the output-layer changes heads [k, C, F]
    (a row without change: all 0)."""
    energy = jnp.sum(jnp.abs(heads), axis=-1)  # [k, C]
    top = jnp.max(energy, axis=-1, keepdims=True)
    energy = energy / jnp.where(top > 0, top, 1.0)  # squares cannot overflow
    squared = energy * energy
    total = jnp.sum(squared, axis=-1, keepdims=True)
    return squared / jnp.where(total > 0, total, 1.0)


def exceedings(neup: jax.Array, threshold: float) -> jax.Array:
    """[k] threshold exceedings: NEUPs above max(threshold, 1/C) times the client's largest."""
    c = neup.shape[-1]
    bound = max(threshold, 1.0 / c) * jnp.max(neup, axis=-1, keepdims=True)
    return jnp.sum(neup > bound, axis=-1)


def same_cluster(d2: jax.Array, valid: jax.Array, key: jax.Array) -> jax.Array:
    """[k, k] bool: the rows share a cluster of the single linkage cut at the median
    nearest-neighbour distance (squared distances d2 [k, k]); a row is with itself."""
    k = valid.shape[0]
    labels = dbscan_labels(d2, k_distance(d2, valid, 2), valid, 2, key)
    shared = (labels[:, None] == labels[None, :]) & (labels[:, None] != NONE)
    return (shared | jnp.eye(k, dtype=bool)) & valid[:, None] & valid[None, :]


def deepsight(*, clients_per_round: int, mode: str, tau: float = 1 / 3, threshold: float = 0.01):
    """DeepSight (module docstring): suspicious when TE <= median TE / 2; clusters whose
    suspicious fraction is >= `tau` (1/3, the paper's) rejected; the others clipped to the
    median norm of all valid updates and averaged. `threshold`: the NEUP factor (0.01).

    Flags: the rejected rows. Scores: the suspicious fraction of the row's cluster."""
    require(0 < tau <= 1, "tau", "in (0, 1]", tau)
    require(0 <= threshold <= 1, "threshold", "in [0, 1]", threshold)
    require_mode(mode)
    del clients_per_round  # one client is its own cluster

    def aggregate(valid, updates, view):
        k = valid.shape[0]
        heads = jnp.where(valid[:, None, None], view.head_rows, 0.0)
        neup = neups(heads)
        te = exceedings(neup, threshold).astype(jnp.float32)
        suspicious = valid & (te <= masked_median(te, valid) / 2)
        key = row_key(heads.reshape(k, -1))
        cosine = same_cluster(cosine_distances(heads.reshape(k, -1)) ** 2, valid, key)
        energies = same_cluster(sq_distances(neup), valid, key)
        together = cosine & energies  # [k, k]
        size = jnp.maximum(together.sum(axis=1), 1)
        fraction = jnp.sum(together & suspicious[None, :], axis=1) / size
        kept = valid & (fraction < tau)
        size = norms(updates)
        bound = masked_median(size, valid)
        scale = jnp.minimum(1.0, bound / jnp.maximum(size, 1e-30))
        delta = masked_mean(scale[:, None] * updates, kept)
        weights = kept.astype(jnp.float32) / jnp.maximum(kept.sum(), 1)
        scores = jnp.where(valid, fraction, 0.0)
        return flagging_verdict(updates, valid & ~kept, scores, mode, (delta, weights), valid=valid)

    return stateless(aggregate, flags_clients=True)
