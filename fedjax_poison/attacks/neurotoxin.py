"""Neurotoxin (Zhang et al., "Neurotoxin: Durable backdoors in federated learning", ICML
2022): a backdoor whose update stays off the coordinates the honest clients move most, so
that their later updates do not wash it out.

The attacker trains on backdoored data (backdoor.py's trigger, target and share), then
keeps only the coordinates of its update that the previous round's global change moved
least: the share `ratio` of the coordinates with the smallest |global change|, the rest
set to 0. The paper projects every local gradient step onto that set; here the trained
update is projected once at the update seam (local training is shared by every client of
the vmapped round). For plain SGD the two differ only through the path the steps take.
Shapes: [k] clients of the round, [d] flattened parameters.
"""

import jax
import jax.numpy as jnp

from fedjax_poison.attacks.backdoor import backdoor
from fedjax_poison.attacks.base import Attack, check, previous_update, replace_rows


def coordinate_mask(global_update: jax.Array, ratio: float) -> jax.Array:
    """[d] bool, True on the coordinates kept: all but the d - round(ratio * d) largest
    |global_update| (ties broken by position, the first one out first). Coordinates the
    global change left at 0 are always kept, so that before any change nothing is dropped."""
    d = global_update.shape[0]
    dropped = d - round(ratio * d)
    magnitude = jnp.abs(global_update)
    order = jnp.argsort(-magnitude, stable=True)  # largest first
    rank = jnp.zeros(d, jnp.int32).at[order].set(jnp.arange(d, dtype=jnp.int32))
    return ~((rank < dropped) & (magnitude > 0))


def neurotoxin(
    *,
    image_shape: tuple[int, int, int],
    num_classes: int,
    target: int = 0,
    share: float = 0.5,
    pattern: str = "square",
    size: int = 4,
    ratio: float = 0.95,
) -> Attack:
    """Backdoor `share` of each poisoning client's examples (backdoor's trigger `pattern`
    of `size`, labelled `target`), then send the trained update with every coordinate
    outside coordinate_mask(previous global change, `ratio`) set to 0: the share `ratio` of
    the coordinates the global model moved least is kept (the authors' code's
    `gradmask_ratio`; 0.95 drops the top 5%). ratio 1: the plain backdoor.
    Knows: its own data, the trigger and the target, and the global model of this round and
    the previous one (every participant downloads them)."""
    check(0 < ratio <= 1, "neurotoxin.ratio", "in (0, 1]", ratio)
    try:
        base = backdoor(
            image_shape=image_shape,
            num_classes=num_classes,
            target=target,
            share=share,
            pattern=pattern,
            size=size,
        )
    except ValueError as e:  # name the field as this attack's
        raise type(e)(str(e).replace("attack.backdoor.", "attack.neurotoxin.")) from None

    def poison_updates(updates, ctx):
        keep = coordinate_mask(previous_update(ctx, updates.shape[1]), ratio)  # [d]
        return replace_rows(updates, jnp.where(keep[None, :], updates, 0.0), ctx.poisoned)

    return Attack(base.poison_data, poison_updates, "backdoor", base.trigger, target)
