"""Rules that read the spread of the rows through their covariance: CAF's filter, and the
eigenvalue SMEA ranks subsets by (subsets.py).

The covariance of k rows in d dimensions has rank below k: its nonzero eigenvalues are
those of a [k, k] Gram matrix, so every eigenvalue here is exact (`eigh` of a k x k
matrix), not a power iteration from a random start as in ByzFL, and a Gram matrix costs
O(k^2 d). Rows are centred and scaled by a power of two before their squares are taken:
covariance does not move under translation, and the squares of rows of 1e18 stay finite.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from fedjax_poison.defenses.base import Defense, make_verdict, require
from fedjax_poison.defenses.numeric import masked_mean, pow2, scale_of
from fedjax_poison.defenses.robust import distances_to, stateless


def centred_gram(updates: jax.Array, valid: jax.Array) -> jax.Array:
    """[k, k] Gram matrix of the valid rows of updates [k, d] centred on their mean and
    scaled by a power of two (zero rows and columns for the invalid ones)."""
    x = updates / scale_of(updates, valid)
    x = jnp.where(valid[:, None], x - masked_mean(x, valid)[None, :], 0.0)
    x = x / pow2(jnp.max(jnp.abs(x)))
    return x @ x.T


def top_eigen(gram: jax.Array, weights: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The largest eigenvalue of the weighted covariance sum_i c_i z_i z_i^T / sum_i c_i
    of rows z [k, d] given by their Gram matrix [k, k] and weights c [k] >= 0 ->
    (eigenvalue [], projections [k]: each z_i on the top eigenvector, up to one factor)."""
    total = jnp.maximum(weights.sum(), 1e-30)
    root = jnp.sqrt(weights)
    values, vectors = jnp.linalg.eigh(root[:, None] * gram * root[None, :] / total)
    return values[-1], gram @ (root * vectors[:, -1])


def caf_weights(x: jax.Array, valid: jax.Array, num_byzantine: int) -> jax.Array:
    """CAF's weights [k] of the returned mean of rows x [k, d] (scaled: entries in (-2, 2)):
    the filter's iterate with the smallest top eigenvalue (`caf`'s docstring).

    Each iteration centres the rows still weighted and scales them by a power of two of
    their own, so a dropped row of 1e18 leaves the others their precision; eigenvalues
    are compared by their logarithm in the rows' common units."""
    k, n = valid.shape[0], valid.sum()
    f = jnp.minimum(num_byzantine, jnp.maximum(n - 1, 0) // 2)  # keeps n - 2f >= 1
    c = valid.astype(jnp.float32)

    def step(_, carry):
        c, best, best_c, going = carry
        live = c > 0
        mean = (c / jnp.maximum(c.sum(), 1e-30)) @ x
        z = jnp.where(live[:, None], x - mean[None, :], 0.0)
        s = pow2(jnp.max(jnp.abs(z)))
        z = z / s
        value, proj = top_eigen(z @ z.T, c)
        log_value = jnp.log(jnp.maximum(value, 0.0)) + 2.0 * jnp.log(s)
        tau = jnp.where(live, proj * proj, 0.0)
        top = jnp.max(tau)
        better = going & (log_value < best)
        best, best_c = jnp.where(better, log_value, best), jnp.where(better, c, best_c)
        keep = jnp.where(tau >= top, 0.0, 1.0 - tau / jnp.where(top > 0, top, 1.0))
        c = jnp.where(going, c * keep, c)  # the row at the top exactly 0, whatever rounding
        going = going & (top > 0) & (c.sum() > n - 2 * f)
        return c, best, best_c, going

    start = (c, jnp.float32(jnp.inf), c, n > 0)
    best_c = lax.fori_loop(0, k, step, start)[2]
    return best_c / jnp.maximum(best_c.sum(), 1e-30)


def caf(*, clients_per_round: int, num_byzantine: int = 1) -> Defense:
    """Covariance-bound Agnostic Filter (Allouah, Guerraoui and Stephan, ICML 2025; ByzFL's
    CAF): weights c_i = 1, then while sum c > n - 2f: mean mu_c and top eigenpair (lambda,
    v) of the c-weighted covariance, tau_i = ((x_i - mu_c) . v)^2, c_i <- c_i (1 - tau_i /
    max tau over the rows still weighted). Returns the mu_c of the smallest lambda seen;
    f = `num_byzantine`, n the valid rows, f at most (n-1)//2.

    Departures, both documented: the eigenpair is exact (module docstring), and tau's
    maximum is taken over the rows still weighted (ByzFL's code takes it over all rows,
    so a row already dropped can stop the filter from dropping another). The first
    iterate (c = 1, the mean) always counts, so f = 0 is the mean. Flags nobody; weights
    are the returned mean's c / sum c; scores the distance to the aggregate.
    """
    require(num_byzantine >= 0, "num_byzantine", ">= 0", num_byzantine)
    need = f"< k/2: caf filters down to n - 2f of k={clients_per_round} rows"
    require(2 * num_byzantine < clients_per_round, "num_byzantine", need, num_byzantine)

    def aggregate(valid, updates, view):
        x = updates / scale_of(updates, valid)
        weights = caf_weights(x, valid, num_byzantine)
        weights = jnp.where(valid, weights, 0.0)
        delta = weights @ updates
        return make_verdict(delta, weights, scores=distances_to(updates, delta), valid=valid)

    return stateless(aggregate)
