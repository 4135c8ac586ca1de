"""What every attack sees and returns, and the helpers attacks share.

Sign convention: an update is `delta = local - global`, what the server adds.
Shapes: [k] clients of the round, [n] examples of a client, [d] flattened parameters,
[C] classes, [F] inputs of the output layer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from fedjax_poison.errors import UserError

# How an attack's success is read: 'flip' by the source classes' recall and the share of
# them predicted as the target; 'backdoor' by the share of triggered test images (not of
# the target class) predicted as the target; 'untargeted' by the accuracy drop against
# the clean twin; 'none' for no attack.
MEASURES = ("none", "flip", "backdoor", "untargeted")
PyTree = Any


class AttackConfigError(UserError, ValueError):
    """An attack field that cannot run; the message names it as `attack.<name>.<field>`."""


class AttackContext(NamedTuple):
    """What the attackers of a round know besides their own data and updates."""

    poisoned: jax.Array  # [k] bool: the clients that poison this round (malicious, in the window)
    client_ids: jax.Array  # [k] int32, which of the N clients these are
    round: jax.Array  # [] int32, 0-based index of the round
    key: jax.Array  # this round's randomness for the attack
    flip: jax.Array  # [C] int32, the label each class becomes (identity where not flipped)
    # [d] the previous round's change of the global model (zeros before the second round):
    # what any client that downloads the global model every round can compute. None outside
    # a round: read it with previous_update().
    global_update: jax.Array | None = None
    # The update seam only: the server's aggregation as it will run this round, a
    # jax.tree_util.Partial updates [k, d] -> aggregate [d] (the server guard, then the rule
    # with its memory as it stands), for attacks that know the rule in use. None outside a
    # round and in the data seam: read it with server_aggregate() (then FedAvg).
    aggregate: Callable[[jax.Array], jax.Array] | None = None
    # Attacks with a state (Attack.init): the state as this seam sees it (after the round's
    # learn step), None outside a round: read it with own_state().
    state: PyTree = None
    # Only for attacks that learn (Attack.learn), else None: the global model's parameters
    # this round, and a jax.tree_util.Partial (params, x [b, H, W, C] float32 pixels in
    # [0, 255], y [b] int32) -> [] mean cross-entropy of the model in evaluation mode (the
    # round's batch statistics), differentiable in params and x.
    params: PyTree = None
    model_loss: Callable[[PyTree, jax.Array, jax.Array], jax.Array] | None = None
    # Likewise, a Partial (params, x [b, H, W, C] float32 pixels) -> [b, F] the input of the
    # model's output layer (its last Dense: the penultimate embedding) in evaluation mode,
    # differentiable in params and x; None where the round has no model to offer.
    model_features: Callable[[PyTree, jax.Array], jax.Array] | None = None


class Attack(NamedTuple):
    """An attack as a pair of pure functions over the round's selected clients.

    Both leave the rows of clients with ctx.poisoned False untouched.
    """

    # (x [k, n, H, W, C] uint8, y [k, n] int32, count [k], ctx) -> (x, y): before training.
    poison_data: Callable[..., tuple[jax.Array, jax.Array]]
    # (updates [k, d], ctx) -> updates [k, d]: after training, before the defense.
    poison_updates: Callable[[jax.Array, AttackContext], jax.Array]
    measure: str  # one of MEASURES
    # Backdoors: images [..., H, W, C] uint8 -> the same with the full trigger (evaluation);
    # for an attack with a state, (images, state) -> images (stamp() calls either).
    trigger: Callable[..., jax.Array] | None = None
    target: int = -1  # backdoors: the label a triggered image should get
    # Attacks that remember across rounds (an optimized trigger): () -> the state before
    # the first round, a pytree of fixed shapes kept in the server state (checkpointed).
    init: Callable[[], PyTree] | None = None
    # (x, y, count, ctx) -> the new state, before the data seam, from ctx.state, ctx.params
    # and ctx.model_loss; it must return ctx.state when nobody poisons. The round builds
    # the model's loss only for a set of attacks with one.
    learn: Callable[..., PyTree] | None = None


def clean_data(x, y, count, ctx):
    """The data seam of an attack that does not touch data."""
    del count, ctx
    return x, y


def clean_updates(updates, ctx):
    """The update seam of an attack that does not touch updates."""
    del ctx
    return updates


def none() -> Attack:
    """No attack: malicious clients behave as honest ones."""
    return Attack(clean_data, clean_updates, "none")


def replace_rows(updates: jax.Array, crafted: jax.Array, poisoned: jax.Array) -> jax.Array:
    """updates [k, d] with the poisoned rows replaced by crafted ([k, d] or [d])."""
    crafted = jnp.broadcast_to(crafted, updates.shape)
    return jnp.where(poisoned[:, None], crafted, updates)


# What a colluding attacker crafts its update from: 'honest', the round's honest updates
# (omniscient, as Shejwalkar & Houmansadr's and Xie et al.'s main setting); 'own', the
# poisoning clients' own trained updates (ALIE's threat model; Shejwalkar & Houmansadr's
# "unknown benign gradients").
KNOWLEDGE = ("honest", "own")


def known_rows(poisoned: jax.Array, knowledge: str = "honest") -> jax.Array:
    """[k] bool: the updates the attacker knows ('honest': not poisoning, 'own': poisoning).

    With none of them in the round, all rows (then the attackers' own updates, trained on
    their own data, stand in for the honest ones).
    """
    rows = ~poisoned if knowledge == "honest" else poisoned
    return jnp.where(rows.any(), rows, jnp.ones_like(rows))


def moments(updates: jax.Array, rows: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Coordinate-wise mean and sample standard deviation (n - 1, as torch.std) [d] of the
    rows [k] bool of updates [k, d]; the deviation is 0 for one row."""
    w = rows.astype(updates.dtype)[:, None]
    n = jnp.maximum(w.sum(), 1.0)
    mean = jnp.sum(w * updates, axis=0) / n
    var = jnp.sum(w * (updates - mean[None]) ** 2, axis=0) / jnp.maximum(n - 1.0, 1.0)
    return mean, jnp.sqrt(var)


def benign_moments(updates: jax.Array, poisoned: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Coordinate-wise mean and standard deviation [d] of the rows not poisoning (all rows
    when every row poisons): what an omniscient colluding attacker knows."""
    return moments(updates, known_rows(poisoned))


def previous_update(ctx: AttackContext, d: int) -> jax.Array:
    """[d] the previous round's change of the global model (zeros where not known)."""
    if ctx.global_update is None:
        return jnp.zeros((d,), jnp.float32)
    return ctx.global_update


def server_aggregate(ctx: AttackContext, updates: jax.Array) -> jax.Array:
    """[d] what the server would add for these updates [k, d]: the round's own rule, or the
    mean of the finite rows (FedAvg behind the server guard) where the context has none."""
    if ctx.aggregate is not None:
        return ctx.aggregate(updates)
    valid = jnp.isfinite(jnp.sqrt(jnp.sum(updates * updates, axis=1)))  # [k]
    w = valid.astype(updates.dtype) / jnp.maximum(valid.sum(), 1)
    return w @ jnp.where(valid[:, None], updates, 0.0)


def own_state(attack: Attack, ctx: AttackContext) -> PyTree:
    """The attack's state as the context carries it, or its initial state outside a round."""
    return attack.init() if ctx.state is None else ctx.state


def stamp(attack: Attack, x: jax.Array, state: PyTree = None) -> jax.Array:
    """Images [..., H, W, C] uint8 with the attack's evaluation trigger; `state` the
    attack's own (None: its initial state), read only by attacks with one."""
    if attack.init is None:
        return attack.trigger(x)
    return attack.trigger(x, attack.init() if state is None else state)


def check(ok: bool, field: str, need: str, got) -> None:
    """Raises AttackConfigError naming `attack.<field>` unless ok."""
    if not ok:
        raise AttackConfigError(f"attack.{field} must be {need}, got {got!r}")


def check_knowledge(attack: str, knowledge: str) -> None:
    """Refuses an `attack.<attack>.knowledge` that is not one of KNOWLEDGE."""
    check(knowledge in KNOWLEDGE, f"{attack}.knowledge", f"one of {KNOWLEDGE}", knowledge)
