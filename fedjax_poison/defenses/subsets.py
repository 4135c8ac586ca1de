"""Rules that choose the n - f rows to average among every subset of that size: MDA (the
smallest diameter) and SMEA (the smallest top eigenvalue of the covariance).

The subsets are enumerated when the rule is built, as the sets of rows left out (every
set of at most f of the k rows: a round with n valid rows leaves out min(f, n - 1) of
them, never an invalid one), so a round is one fixed-shape program; a factory refuses a
(k, f) whose C(k, f) subsets would not fit. Subsets whose criterion ties (within a
relative 1e-5, as identical rows do, whatever float rounding their positions bring)
share the choice equally: the verdict never depends on the rows' order.
"""

from __future__ import annotations

import itertools
from math import comb

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_poison.defenses.base import (
    Defense,
    flagging_verdict,
    require,
    require_mode,
    weighted_mean,
)
from fedjax_poison.defenses.covariance import centred_gram
from fedjax_poison.defenses.numeric import scale_of, sq_distances
from fedjax_poison.defenses.robust import distances_to, stateless

MAX_ENTRIES = 1 << 24  # subsets x k x k: what a round may hold while it compares them
TIE = 1e-5  # criteria this close (relative to the round's scale) are a tie


def left_out(k: int, num_byzantine: int, rule: str) -> np.ndarray:
    """[S, k] bool: every set of at most f of k rows (the rows a subset leaves out)."""
    require(num_byzantine >= 0, "num_byzantine", ">= 0", num_byzantine)
    need = f"< k/2: {rule} averages n - f of k={k} rows"
    require(2 * num_byzantine < k, "num_byzantine", need, num_byzantine)
    count = sum(comb(k, j) for j in range(num_byzantine + 1))
    size = f"small enough that C(k, f) * k^2 <= {MAX_ENTRIES} ({rule} tries every subset; k={k})"
    require(count * k * k <= MAX_ENTRIES, "num_byzantine", size, num_byzantine)
    sets = np.zeros((count, k), bool)
    rows = (c for j in range(num_byzantine + 1) for c in itertools.combinations(range(k), j))
    for i, out in enumerate(rows):
        sets[i, list(out)] = True
    return sets


def members(sets: np.ndarray, valid: jax.Array, num_byzantine: int):
    """(member [S, k] bool: the valid rows each subset keeps, eligible [S] bool: the
    subset leaves out exactly min(f, n - 1) valid rows and no invalid one)."""
    out = jnp.asarray(sets)
    n = valid.sum()
    f = jnp.minimum(num_byzantine, jnp.maximum(n - 1, 0))
    eligible = (out.sum(axis=1) == f) & ~jnp.any(out & ~valid[None, :], axis=1)
    return valid[None, :] & ~out, eligible


def shared_choice(criterion, member, eligible, scale) -> jax.Array:
    """[k] weights: the mean over the eligible subsets whose criterion [S] is within
    TIE * scale of the smallest, of 1/|S| on each subset's members."""
    best = jnp.min(jnp.where(eligible, criterion, jnp.inf))
    tied = eligible & (criterion <= best + TIE * scale)
    m = member.astype(jnp.float32)
    per = m / jnp.maximum(m.sum(axis=1, keepdims=True), 1.0)
    weights = jnp.sum(jnp.where(tied[:, None], per, 0.0), axis=0)
    return weights / jnp.maximum(tied.sum(), 1)


def subset_rule(sets, mode: str, num_byzantine: int, criterion_of) -> Defense:
    """A rule averaging the subset chosen by criterion_of(updates, valid, member) ->
    (criterion [S], scale []); the rows outside it are flagged."""

    def aggregate(valid, updates, view):
        member, eligible = members(sets, valid, num_byzantine)
        criterion, scale = criterion_of(updates, valid, member)
        share = jnp.where(valid, shared_choice(criterion, member, eligible, scale), 0.0)
        delta, weights = weighted_mean(updates, share)
        scores = distances_to(updates, delta)
        flags = valid & (share <= 0)
        return flagging_verdict(updates, flags, scores, mode, (delta, weights), valid=valid)

    return stateless(aggregate, flags_clients=True)


def mda(*, clients_per_round: int, mode: str, num_byzantine: int = 1) -> Defense:
    """Minimum-Diameter Averaging (El Mhamdi et al., PODC 2020; ByzFL's MDA): the mean of
    the n - f valid rows whose largest pairwise distance is the smallest; f =
    `num_byzantine`, at most n - 1. A diameter is one pair's distance, so subsets often
    tie (leaving out either of two rows that the second-farthest pair does not hold):
    tied subsets share the choice (module docstring), where ByzFL's loop keeps the first
    in its order. Rows left out are flagged; scores are distances to the aggregate."""
    require_mode(mode)
    sets = left_out(clients_per_round, num_byzantine, "mda")

    def diameters(updates, valid, member):
        d2 = sq_distances(updates / scale_of(updates, valid))
        both = member[:, :, None] & member[:, None, :]
        diameter = jnp.max(jnp.where(both, d2[None], 0.0), axis=(1, 2))
        return diameter, jnp.max(jnp.where(valid[:, None] & valid[None, :], d2, 0.0))

    return subset_rule(sets, mode, num_byzantine, diameters)


def top_eigenvalues(updates, valid, member):
    """[S] largest eigenvalue of each subset's covariance (times its size, the same for
    all), and the round's scale: the valid rows' total variance."""
    gram = centred_gram(updates, valid)

    def of(keep):
        m = keep.astype(jnp.float32)
        p = jnp.diag(m) - jnp.outer(m, m) / jnp.maximum(m.sum(), 1.0)  # centres the subset
        return jnp.linalg.eigvalsh(p @ gram @ p)[-1]

    return jax.vmap(of)(member), jnp.trace(gram)


def smea(*, clients_per_round: int, mode: str, num_byzantine: int = 1) -> Defense:
    """Smallest Maximum Eigenvalue Averaging (Allouah et al., ICML 2023; ByzFL's SMEA): the
    mean of the n - f valid rows whose empirical covariance has the smallest largest
    eigenvalue; f = `num_byzantine`, at most n - 1. The eigenvalue is exact (covariance.py),
    where ByzFL runs one power iteration from a random vector. Rows left out are flagged;
    scores are distances to the aggregate."""
    require_mode(mode)
    sets = left_out(clients_per_round, num_byzantine, "smea")
    return subset_rule(sets, mode, num_byzantine, top_eigenvalues)
