"""What the server does with the updates it got, around the defense: the guard that keeps
non-finite updates out, the verdict as applied, the BatchNorm statistics, degenerate rounds.

Sign convention: an update is `delta = local - global`, what the server adds.
Shapes: [k] clients of the round, [d] flattened parameters.
"""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from fedjax_poison import defenses
from fedjax_poison.models import HEAD

PyTree = Any


def head_kernel_rows(params: PyTree) -> jax.Array:
    """The output layer's kernel as [..., C, F] rows, one per class."""
    return jnp.swapaxes(params[HEAD]["kernel"], -1, -2)


def head_index(params: PyTree) -> np.ndarray:
    """[F, C] int32: where the output kernel sits in `ravel_pytree(params)`."""
    flat, unravel = ravel_pytree(params)
    assert flat.size < 2**24, "float32 positions are exact below 2**24 parameters"
    positions = unravel(jnp.arange(flat.size, dtype=flat.dtype))
    return np.asarray(positions[HEAD]["kernel"]).astype(np.int32)


def weighted_mean(trees: PyTree, weights: jax.Array) -> PyTree:
    """Mean over the leading [k] axis of every leaf, weighted by weights [k] (summing to 1)."""
    return jax.tree.map(lambda t: jnp.tensordot(weights, t, axes=1), trees)


def guard(updates: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(updates with invalid rows zeroed [k, d], valid [k]): a row is valid when its norm is
    finite, which excludes NaN, inf and rows so large that their norm overflows float32."""
    valid = jnp.isfinite(jnp.sqrt(jnp.sum(updates * updates, axis=1)))
    return jnp.where(valid[:, None], updates, 0.0), valid


def server_verdict(verdict: defenses.Verdict, valid: jax.Array) -> defenses.Verdict:
    """The verdict as the server applies it: invalid rows flagged and without weight, and a
    non-finite aggregate replaced by no change at all."""
    weights = jnp.where(valid, verdict.weights, 0.0)
    total = weights.sum()
    weights = jnp.where(total > 0, weights / jnp.where(total > 0, total, 1.0), 0.0)
    delta = jnp.where(jnp.isfinite(verdict.delta).all(), verdict.delta, 0.0)
    return verdict._replace(delta=delta, weights=weights, flags=verdict.flags | ~valid)


def average_batch_stats(old: PyTree, stats: PyTree, weights: jax.Array) -> PyTree:
    """The clients' BatchNorm statistics [k, ...] averaged with the verdict's weights [k],
    leaving out clients whose statistics are not finite; the old ones if nobody is left
    (or the model keeps none)."""
    leaves = jax.tree.leaves(stats)
    if not leaves:  # a model without BatchNorm
        return old
    ok = jnp.stack([jnp.isfinite(a.reshape(a.shape[0], -1)).all(1) for a in leaves]).all(0)
    w = jnp.where(ok, weights, 0.0)
    total = w.sum()
    w = w / jnp.where(total > 0, total, 1.0)
    clean = jax.tree.map(lambda a: jnp.where(ok.reshape(-1, *[1] * (a.ndim - 1)), a, 0.0), stats)
    averaged = weighted_mean(clean, w)
    return jax.tree.map(lambda new, prev: jnp.where(total > 0, new, prev), averaged, old)


def is_degenerate(verdict: defenses.Verdict) -> jax.Array:
    """[] bool: the aggregate kept nobody, or one client of k > 1 after dropping flagged ones
    (a rule that picks one client by design, Krum, flags nobody; detect mode keeps all)."""
    k = verdict.flags.shape[0]
    kept = (verdict.weights > 0).sum()
    return (kept == 0) | ((k > 1) & (kept <= 1) & verdict.flags.any())


def all_finite(tree: PyTree) -> jax.Array:
    """[] bool: no NaN or inf in any leaf (one reduction per leaf, on device)."""
    return jnp.all(jnp.stack([jnp.isfinite(leaf).all() for leaf in jax.tree.leaves(tree)]))
