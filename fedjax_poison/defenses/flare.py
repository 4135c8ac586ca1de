"""FLARE (Wang, Chen, Wang, Salem and Backes, AsiaCCS 2022): trust scores from the maximum
mean discrepancy (MMD) between what the clients' models have learned, each client trusted
by how often it is among the others' nearest neighbours.

FLARE compares the penultimate-layer representations (PLRs) of each local model on a small
server dataset: the round view holds updates, not local models run on inputs, so this
version compares each client's output-layer change instead, as a set of C vectors in R^F
(one per class: row c is what the client moved logit c by, per penultimate feature). The
MMD of two such sets is FLARE's with the Gaussian kernel, over the same F features the
PLRs live in; what is lost is the input data's view of the rest of the network.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fedjax_poison.defenses.base import make_verdict, require, weighted_mean
from fedjax_poison.defenses.numeric import lowest_shares, masked_median, row_key, scale_of
from fedjax_poison.defenses.robust import stateless


def mmd_matrix(sets: jax.Array, valid: jax.Array, bandwidth: float) -> jax.Array:
    """[k, k] squared MMD (biased estimate) between the sets of rows sets [k, C, F] under
    exp(-|a - b|^2 / (2 h^2)); h = `bandwidth` in the sets' units, or (0) the median
    distance between rows of the valid sets."""
    k, c, f = sets.shape
    s = scale_of(sets.reshape(k, c * f), valid)
    rows = (sets / s).reshape(k * c, f)
    d2 = jnp.sum((rows[:, None, :] - rows[None, :, :]) ** 2, axis=-1)  # [kC, kC]
    mine = jnp.repeat(valid, c)
    pairs = mine[:, None] & mine[None, :] & ~jnp.eye(k * c, dtype=bool)
    median = masked_median(jnp.where(pairs, d2, jnp.inf).reshape(-1), pairs.reshape(-1))
    h2 = jnp.where(median > 0, median, 1.0) if bandwidth <= 0 else (bandwidth / s) ** 2
    kernel = jnp.exp(-d2 / (2 * h2)).reshape(k, c, k, c).mean(axis=(1, 3))  # [k, k]
    diag = jnp.diag(kernel)
    return jnp.maximum(diag[:, None] + diag[None, :] - 2 * kernel, 0.0)


def flare(
    *,
    clients_per_round: int,
    temperature: float = 1.0,
    neighbours: float = 0.5,
    bandwidth: float = 0.0,
):
    """FLARE over the output-layer changes (module docstring): each valid client's
    floor(`neighbours` n) nearest other valid clients by MMD each give a vote (rows tied at
    the cut share it); trust = softmax(votes / `temperature`) over the valid clients, the
    aggregate the trust-weighted mean (the paper's 50% neighbours and temperature 1).
    `bandwidth` 0: the Gaussian kernel's width is the median distance between rows.

    Nobody is flagged: a client the others never pick keeps a small weight. Scores: the
    votes a client did not get (n - 1 minus its votes)."""
    require(temperature > 0, "temperature", "> 0", temperature)
    require(0 <= neighbours < 1, "neighbours", "in [0, 1) (a fraction of the clients)", neighbours)
    require(bandwidth >= 0, "bandwidth", ">= 0 (0: the median distance)", bandwidth)
    del clients_per_round  # any k: one client gets all the trust

    def aggregate(valid, updates, view):
        k = valid.shape[0]
        mmd = mmd_matrix(jnp.where(valid[:, None, None], view.head_rows, 0.0), valid, bandwidth)
        n = valid.sum()
        count = jnp.floor(neighbours * n.astype(jnp.float32) + 1e-6)
        keys = row_key(view.head_rows.reshape(k, -1))
        others = valid[None, :] & ~jnp.eye(k, dtype=bool)  # [k, k]: row i picks among these
        pick = jax.vmap(lambda d, mask: lowest_shares((d, keys), mask, count))(mmd, others)
        votes = jnp.sum(jnp.where(valid[:, None], pick, 0.0), axis=0)  # [k]
        top = jnp.max(jnp.where(valid, votes, 0.0))
        trust = jnp.where(valid, jnp.exp((votes - top) / temperature), 0.0)  # softmax
        delta, weights = weighted_mean(updates, trust)
        scores = jnp.where(valid, jnp.maximum(n - 1, 0) - votes, 0.0)
        return make_verdict(delta, weights, scores=scores, valid=valid)

    return stateless(aggregate)
