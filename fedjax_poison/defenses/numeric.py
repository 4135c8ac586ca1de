"""Arithmetic that hostile updates cannot break, and choices that never depend on row order.

A row the server lets through has a finite norm, so each of its entries is below ~1.8e19
and any sum of k rows is finite; only squares can overflow (a squared distance between two
rows of 1e18 in every coordinate does). Squares are therefore taken of rows scaled by a
power of two (exact: no rounding) and scaled back at the end, where +inf is a fair answer.

Every choice among rows (the lowest scores, the nearest neighbours) is made by value: rows
tied on every key share the places left, so that a rule's verdict moves with its rows when
they are permuted.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax


def row_norms(x: jax.Array) -> jax.Array:
    """Euclidean norm over the last axis (plain: squares may overflow; see `norms`)."""
    return jnp.sqrt(jnp.sum(x * x, axis=-1))


def usable(view: Any) -> jax.Array:
    """[k] bool: the row was valid when it arrived and its norm is finite (the server's test,
    repeated so that a rule also holds when called on its own)."""
    return view.valid & jnp.isfinite(row_norms(view.updates))


def clean(view: Any) -> tuple[jax.Array, jax.Array]:
    """(valid [k], updates [k, d] with the invalid rows zeroed)."""
    valid = usable(view)
    return valid, jnp.where(valid[:, None], view.updates, 0.0)


def pow2(top: jax.Array) -> jax.Array:
    """A power of two s with top in [s, 2s), elementwise; 1 where top is 0 (or not finite)."""
    _, exponent = jnp.frexp(top)  # top = mantissa * 2**exponent, mantissa in [0.5, 1)
    s = jnp.ldexp(jnp.ones_like(top), exponent - 1)
    return jnp.where((top > 0) & jnp.isfinite(top), s, 1.0)


def scale_of(x: jax.Array, valid: jax.Array) -> jax.Array:
    """[] a power of two s: the valid rows of x [k, d] divided by s lie in (-2, 2)."""
    return pow2(jnp.max(jnp.where(valid[:, None], jnp.abs(x), 0.0)))


def norms(x: jax.Array) -> jax.Array:
    """Euclidean norm of each row of x [m, p] -> [m], without overflow or underflow of the
    squares (inf only where the norm itself exceeds float32)."""
    s = pow2(jnp.max(jnp.abs(x), axis=-1))
    return s * row_norms(x / s[..., None])


def unit_rows(x: jax.Array) -> jax.Array:
    """Each row of x [m, p] over its norm; zero rows stay zero."""
    n = norms(x)
    return x / jnp.where(n > 0, n, 1.0)[:, None]


def sq_distances(x: jax.Array) -> jax.Array:
    """Pairwise squared distances of the rows of x [m, p] -> [m, m] (rows already scaled)."""
    diff = x[:, None, :] - x[None, :, :]
    return jnp.sum(diff * diff, axis=-1)


def rescale(value: jax.Array, factor: jax.Array) -> jax.Array:
    """value * factor without 0 * inf = NaN: 0 stays 0, an overflow becomes inf."""
    return jnp.where(value == 0, 0.0, value * factor)


def masked_median(x: jax.Array, valid: jax.Array) -> jax.Array:
    """Median over the valid rows of x [k, ...] (mean of the two middle values when their
    count is even) -> [...]; 0 when no row is valid."""
    n = valid.sum()
    mask = valid.reshape(valid.shape + (1,) * (x.ndim - 1))
    ordered = jnp.sort(jnp.where(mask, x, jnp.inf), axis=0)
    last = x.shape[0] - 1
    lo = lax.dynamic_index_in_dim(ordered, jnp.clip((n - 1) // 2, 0, last), 0, keepdims=False)
    hi = lax.dynamic_index_in_dim(ordered, jnp.clip(n // 2, 0, last), 0, keepdims=False)
    return jnp.where(n > 0, (lo + hi) / 2, 0.0)


def masked_mean(x: jax.Array, keep: jax.Array) -> jax.Array:
    """Mean of the rows of x [k, ...] where keep [k] -> [...]; 0 when none is kept."""
    mask = keep.reshape(keep.shape + (1,) * (x.ndim - 1))
    return jnp.sum(jnp.where(mask, x, 0.0), axis=0) / jnp.maximum(keep.sum(), 1)


def row_key(x: jax.Array) -> jax.Array:
    """[k] uint32 of each row of x [k, d] from its exact values (-0 counted as 0): the last
    key for choices between rows with equal scores. Equal rows get equal keys wherever they
    sit: the key sums hashed bits as integers, exact in any order of summation (a float
    projection is not: its last bit can depend on the row's position in the batch)."""
    x = jnp.where(x == 0, 0.0, x).astype(jnp.float32)
    bits = lax.bitcast_convert_type(x, jnp.uint32)
    salt = hash32(jnp.arange(x.shape[-1], dtype=jnp.uint32) ^ jnp.uint32(0x9E3779B9))
    return hash32(jnp.sum(hash32(bits ^ salt[None, :]), axis=-1, dtype=jnp.uint32))


def lowest_shares(keys: tuple[jax.Array, ...], valid: jax.Array, count) -> jax.Array:
    """Pick the `count` valid rows lowest in the lexicographic order of `keys` ([k] arrays)
    -> share [k] in [0, 1], summing to min(count, valid rows).

    Rows tied on every key share the places left equally, so the pick is a function of the
    keys alone, never of the rows' positions."""
    k = valid.shape[0]
    before = jnp.zeros((k, k), bool)  # before[i, j]: row j comes before row i
    tied = jnp.ones((k, k), bool)
    for key in keys:
        mine, other = key[:, None], key[None, :]
        before = before | (tied & (other < mine))
        tied = tied & (other == mine)
    ahead = jnp.sum(before & valid[None, :], axis=1)
    ties = jnp.sum(tied & valid[None, :], axis=1)
    share = jnp.clip(count - ahead, 0, ties) / jnp.maximum(ties, 1)
    return jnp.where(valid, share, 0.0).astype(jnp.float32)


def sample_coordinates(key: jax.Array, d: int, b: int) -> jax.Array:
    """[b] distinct coordinates of [0, d), uniformly at random (the b largest of d uniform
    draws; all d when b = d)."""
    return lax.top_k(jax.random.uniform(key, (d,)), b)[1]


def hash32(x: jax.Array) -> jax.Array:
    """A well-mixed uint32 of each uint32 entry of x (MurmurHash3's finalizer): a cheap,
    deterministic stand-in for a random draw keyed by integers."""
    x = x.astype(jnp.uint32)
    x = (x ^ (x >> 16)) * jnp.uint32(0x85EBCA6B)
    x = (x ^ (x >> 13)) * jnp.uint32(0xC2B2AE35)
    return x ^ (x >> 16)


def uniform_over(keep: jax.Array) -> jax.Array:
    """[k] weights 1/n on the n kept rows; zeros if none."""
    keep = keep.astype(jnp.float32)
    return keep / jnp.maximum(keep.sum(), 1.0)
