"""Krum, Multi-Krum and Bulyan: rules that choose updates by their distances to each other.

Conventions. Krum's score of a row sums its squared distances to its n - f - 2 nearest
valid neighbours (Blanchard et al.'s n - f - 2; later papers write n - f - 1 with the row
itself counted), n the valid rows, f = `num_byzantine`, at least one neighbour. Distances are
taken of the rows scaled by a power of two, so that rows of 1e18 cannot overflow them and
their scores are finite (reported scaled back: +inf where that overflows float32). Ties are
broken by value, never by position: equal scores go to the row with the lower summed squared
distance to all the others, then to the lower integer hash of the row's exact values
(`numeric.row_key`: equal for identical rows wherever they sit, unlike a float projection
whose last bit can depend on the row's position); identical rows share their picks equally.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from fedjax_poison.defenses.base import (
    Defense,
    flagging_verdict,
    make_verdict,
    require,
    require_mode,
    weighted_mean,
)
from fedjax_poison.defenses.numeric import (
    lowest_shares,
    masked_median,
    rescale,
    row_key,
    scale_of,
    sq_distances,
)
from fedjax_poison.defenses.robust import stateless


def scores_from(d2: jax.Array, alive: jax.Array, num_byzantine: int) -> jax.Array:
    """Krum scores [k] from squared distances d2 [k, k] among the `alive` rows: the sum
    over the n - f - 2 nearest other alive rows (at least 1, at most n - 1); +inf if not
    alive."""
    k = alive.shape[0]
    others = alive[None, :] & ~jnp.eye(k, dtype=bool)
    ordered = jnp.sort(jnp.where(others, d2, jnp.inf), axis=1)
    n = alive.sum()
    count = jnp.clip(n - num_byzantine - 2, 1, jnp.maximum(n - 1, 0))
    take = jnp.arange(k)[None, :] < count
    return jnp.where(alive, jnp.sum(jnp.where(take, ordered, 0.0), axis=1), jnp.inf)


def spread_from(d2: jax.Array, alive: jax.Array) -> jax.Array:
    """[k] each row's summed squared distance to every alive row: the first tie-break of
    Krum scores (of two mutual nearest neighbours, the one nearer to the rest wins)."""
    return jnp.sum(jnp.where(alive[None, :], d2, 0.0), axis=1)


def geometry(updates: jax.Array, valid: jax.Array):
    """(squared distances of the rows scaled by s [k, k], their keys for the last tie-break
    [k] (`numeric.row_key`), s): s a power of two that keeps every square finite."""
    s = scale_of(updates, valid)
    return sq_distances(updates / s), row_key(updates), s


def reported(d2, valid, num_byzantine: int, s) -> jax.Array:
    """Krum scores in the updates' own units [k]: finite, or +inf where that overflows
    float32, and for invalid rows."""
    scaled = scores_from(d2, valid, num_byzantine)
    return jnp.where(valid, rescale(scaled, s * s), jnp.inf)


def krum_scores(updates: jax.Array, valid: jax.Array, num_byzantine: int) -> jax.Array:
    """Krum score of each row of updates [k, d] among the valid rows -> [k] (`reported`)."""
    d2, _, s = geometry(updates, valid)
    return reported(d2, valid, num_byzantine, s)


def lowest_by_krum(d2, key, alive, num_byzantine: int, count) -> jax.Array:
    """lowest_shares of the alive rows by (Krum score, spread, row key)."""
    keys = (scores_from(d2, alive, num_byzantine), spread_from(d2, alive), key)
    return lowest_shares(keys, alive, count)


def require_krum(num_byzantine: int, k: int, rule: str) -> None:
    """Krum's scores need k > 2f + 2 rows."""
    require(num_byzantine >= 0, "num_byzantine", ">= 0", num_byzantine)
    need = f"< (k-2)/2: {rule} needs k > 2f+2, k={k}"
    require(k > 2 * num_byzantine + 2, "num_byzantine", need, num_byzantine)


def krum(*, clients_per_round: int, num_byzantine: int = 1) -> Defense:
    """The update with the lowest Krum score (Blanchard et al., NeurIPS 2017); f =
    `num_byzantine`, neighbours n - f - 2 of the n valid rows (see the module docstring)."""
    require_krum(num_byzantine, clients_per_round, "krum")

    def aggregate(valid, updates, view):
        d2, key, s = geometry(updates, valid)
        share = lowest_by_krum(d2, key, valid, num_byzantine, 1)
        delta, weights = weighted_mean(updates, share)
        scores = reported(d2, valid, num_byzantine, s)
        return make_verdict(delta, weights, scores=scores, valid=valid)

    return stateless(aggregate)


def multi_krum(
    *, clients_per_round: int, mode: str, num_byzantine: int = 1, m: int = -1
) -> Defense:
    """Mean of the m updates with the lowest Krum scores; the rest are flagged (Blanchard
    et al., NeurIPS 2017). m at most n, or n - f when it is -1, n the valid rows."""
    require_krum(num_byzantine, clients_per_round, "multi_krum")
    require(m == -1 or 1 <= m <= clients_per_round, "m", f"in [1, k={clients_per_round}] or -1", m)
    require_mode(mode)
    chosen = m

    def aggregate(valid, updates, view):
        n = valid.sum()
        count = jnp.minimum(chosen, n) if chosen > 0 else n - num_byzantine
        count = jnp.maximum(count, jnp.minimum(n, 1))
        d2, key, s = geometry(updates, valid)
        share = lowest_by_krum(d2, key, valid, num_byzantine, count)
        scores = reported(d2, valid, num_byzantine, s)
        aggregate = weighted_mean(updates, share)
        return flagging_verdict(updates, share <= 0, scores, mode, aggregate, valid=valid)

    return stateless(aggregate, flags_clients=True)


def bulyan_counts(n: jax.Array, num_byzantine: int) -> tuple[jax.Array, jax.Array]:
    """(theta, beta) = (n - 2f, theta - 2f) of n valid rows, each at least 1 (0 if n = 0):
    Bulyan's guarantee needs n >= 4f + 3, the round still aggregates below it."""
    theta = jnp.where(n > 0, jnp.maximum(n - 2 * num_byzantine, 1), 0)
    return theta, jnp.minimum(jnp.maximum(theta - 2 * num_byzantine, 1), theta)


def bulyan_select(d2, key, valid, num_byzantine: int, theta):
    """Bulyan's first phase over the `geometry` of the rows: pick theta rows one at a time,
    each the lowest Krum score among the rows not yet picked -> (picked [k] bool, share [k]
    in [0, 1]).

    Rows tied on every key are identical (at distance 0, same row key): which of them is
    picked changes no value, and `share` spreads the picks equally over identical rows."""
    k = valid.shape[0]

    def pick(i, chosen):
        alive = valid & ~chosen
        best = lowest_by_krum(d2, key, alive, num_byzantine, 1)
        first = jnp.argmax(best > 0)
        return jnp.where(i < theta, chosen.at[first].set(True), chosen)

    chosen = lax.fori_loop(0, k, pick, jnp.zeros((k,), bool))
    same = (d2 == 0) & (key[:, None] == key[None, :]) & valid[None, :]
    share = (same.astype(jnp.float32) @ chosen.astype(jnp.float32)) / jnp.maximum(same.sum(1), 1)
    return chosen, jnp.where(valid, share, 0.0)


def trimmed_around_median(updates, picked, beta) -> jax.Array:
    """Per coordinate, the mean of the beta picked values closest to their median -> [d];
    values tied at the cut share the places left."""
    med = masked_median(updates, picked)
    gap = jnp.where(picked[:, None], jnp.abs(updates - med[None, :]), jnp.inf)
    ordered = jnp.sort(gap, axis=0)
    cut = lax.dynamic_index_in_dim(ordered, jnp.maximum(beta - 1, 0), 0, keepdims=False)
    closer, at_cut = gap < cut[None, :], gap == cut[None, :]
    n_closer, n_cut = closer.sum(0), at_cut.sum(0)
    frac = (beta - n_closer) / jnp.maximum(n_cut, 1)
    w = jnp.where(closer, 1.0, jnp.where(at_cut, frac[None, :], 0.0))
    values = jnp.where(picked[:, None], updates, 0.0)
    return jnp.sum(w * values, axis=0) / jnp.maximum(beta, 1).astype(jnp.float32)


def bulyan(*, clients_per_round: int, mode: str, num_byzantine: int = 1) -> Defense:
    """Krum-select theta = n - 2f updates, then per coordinate average the beta = theta - 2f
    values closest to their median (El Mhamdi et al., ICML 2018); n the valid rows, each
    count at least 1. Unpicked rows are flagged."""
    require(num_byzantine >= 0, "num_byzantine", ">= 0", num_byzantine)
    k = clients_per_round
    need = f"<= (k-3)/4: bulyan needs k >= 4f+3, k={k}"
    require(k >= 4 * num_byzantine + 3, "num_byzantine", need, num_byzantine)
    require_mode(mode)

    def aggregate(valid, updates, view):
        theta, beta = bulyan_counts(valid.sum(), num_byzantine)
        d2, key, s = geometry(updates, valid)
        picked, share = bulyan_select(d2, key, valid, num_byzantine, theta)
        delta = trimmed_around_median(updates, picked, beta)
        weights = share / jnp.maximum(theta, 1).astype(jnp.float32)
        scores = reported(d2, valid, num_byzantine, s)
        return flagging_verdict(updates, share <= 0, scores, mode, (delta, weights), valid=valid)

    return stateless(aggregate, flags_clients=True)
