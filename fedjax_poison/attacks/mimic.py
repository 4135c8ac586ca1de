"""Mimic (Karimireddy, He and Jaggi, ICLR 2022): the attackers copy one honest client, so
that under heterogeneous data a robust rule over-weights that client and under-weights
the rest. Shapes: [k] clients of the round, [d] flattened parameters.
"""

import jax
import jax.numpy as jnp

from fedjax_poison.attacks.base import Attack, clean_data, known_rows, moments, replace_rows


def mimicked(updates: jax.Array, honest: jax.Array) -> jax.Array:
    """[] The index of the honest row [k] farthest from the honest mean along the top
    principal direction of the honest updates (exact: eigh of their k x k Gram matrix)."""
    mean, _ = moments(updates, honest)
    z = jnp.where(honest[:, None], updates - mean[None, :], 0.0)
    z = z / jnp.maximum(jnp.max(jnp.abs(z)), 1e-30)
    gram = z @ z.T
    _, vectors = jnp.linalg.eigh(gram)
    along = gram @ vectors[:, -1]  # each row's projection, up to one factor
    return jnp.argmax(jnp.where(honest, jnp.abs(along), -1.0))


def mimic() -> Attack:
    """Every poisoning client sends the update of one honest client of the round: the one
    farthest from the honest mean along the honest updates' top principal direction (the
    paper's choice of i* by the top eigenvector, made afresh each round since a round's
    clients change, and exact rather than by its warm-up power iterations).
    Knows: the round's honest updates (omniscient, as in the paper)."""

    def poison_updates(updates, ctx):
        honest = known_rows(ctx.poisoned, "honest")
        return replace_rows(updates, updates[mimicked(updates, honest)], ctx.poisoned)

    return Attack(clean_data, poison_updates, "untargeted")
