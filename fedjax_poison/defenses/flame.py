"""FLAME (Nguyen et al., USENIX Security 2022): keep the majority cluster of update
directions, clip to the median norm, add Gaussian noise.

HDBSCAN inside a jitted round: FLAME runs HDBSCAN over the pairwise cosine distances with
min_cluster_size = n // 2 + 1, min_samples = 1 and a single cluster allowed. With those
settings HDBSCAN reduces to single linkage with a size threshold above n / 2, which
`cluster.majority_cluster` computes exactly and without Python control flow (Prim's tree and
two passes of merges over [k, k] distances); the tests compare it with scikit-learn's HDBSCAN.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fedjax_poison.defenses.base import (
    Defense,
    flagging_verdict,
    no_memory,
    require,
    require_mode,
    require_two_clients,
)
from fedjax_poison.defenses.cluster import majority_cluster
from fedjax_poison.defenses.numeric import clean, masked_mean, masked_median, norms, unit_rows

NOISE_STREAM = 0xF1A3E  # FLAME's noise: a key of its own, folded with the round


def cosine_distances(updates: jax.Array) -> jax.Array:
    """[k, k] 1 - cosine of the rows of updates [k, d], in [0, 2]; zero rows are at 1."""
    unit = unit_rows(updates)
    return jnp.clip(1.0 - unit @ unit.T, 0.0, 2.0)


def flame(*, clients_per_round: int, mode: str, noise_lambda: float = 0.001) -> Defense:
    """FLAME: the updates outside the majority cluster of cosine distances are flagged; the
    others are clipped to the median norm S of all valid updates and averaged, and the
    aggregate gets Gaussian noise of standard deviation `noise_lambda` * S per coordinate
    (the paper's lambda, 0.001 for image classification).

    Departures, all documented: distances are between updates (local - global), not whole
    models (the shared global model would make every cosine close to 1); HDBSCAN is computed
    exactly as single linkage (module docstring); the noise key is derived from the round
    alone, so it is the same for every ordering of the clients. Scores: the mean cosine
    distance to the kept updates.
    """
    require(noise_lambda >= 0, "noise_lambda", ">= 0", noise_lambda)
    require_two_clients(clients_per_round)  # a majority cluster needs two rows to compare
    require_mode(mode)

    def apply(view, memory):
        valid, updates = clean(view)
        dist = cosine_distances(updates)
        kept = majority_cluster(dist, valid)
        size = norms(updates)
        bound = masked_median(size, valid)
        scale = jnp.minimum(1.0, bound / jnp.maximum(size, 1e-30))
        clipped = masked_mean(scale[:, None] * updates, kept)
        key = jax.random.fold_in(jax.random.key(NOISE_STREAM), view.round)
        noise = jax.random.normal(key, clipped.shape, jnp.float32)
        delta = jnp.where(kept.any(), clipped + noise_lambda * bound * noise, 0.0)
        weights = kept.astype(jnp.float32) / jnp.maximum(kept.sum(), 1)
        scores = jnp.sum(jnp.where(kept[None, :], dist, 0.0), axis=1) / jnp.maximum(kept.sum(), 1)
        verdict = flagging_verdict(updates, ~kept, scores, mode, (delta, weights), valid=valid)
        return verdict, memory

    return Defense(no_memory, apply, root_size=0, flags_clients=True)
