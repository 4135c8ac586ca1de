"""Label flipping that tries to evade the paper's PCA detector.

The detector (defenses/source_pca.py) clusters each client's change of the source class's
output row, and tells attackers apart because that row moves against the global one when
a client has no example labelled with the source class. This attacker flips labels as
usual, but (a) may leave a share of its source examples clean, and (b) replaces its
source-class output row by a blend with the honest clients' mean row, so that the row the
detector reads looks honest while the flipped labels still shape the other layers and the
target class's row.
"""

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_poison.attacks.base import Attack, benign_moments, check, replace_rows


def adaptive_flip(
    *, head_index: np.ndarray, flip_share: float = 1.0, row_blend: float = 1.0
) -> Attack:
    """Flip `flip_share` of the source-class labels (drawn per example and round), then set
    the source class's output row of the update to (1 - row_blend) x its own + row_blend x
    the honest clients' mean row (the first flipped class of `attack.flips`).

    head_index: [F, C] positions of the output kernel in the flattened parameters.
    Knows: its own data, the model's layout, the round's honest updates (omniscient).
    """
    check(0 < flip_share <= 1, "adaptive_flip.flip_share", "in (0, 1]", flip_share)
    check(0 <= row_blend <= 1, "adaptive_flip.row_blend", "in [0, 1]", row_blend)
    head_index = jnp.asarray(head_index)

    def poison_data(x, y, count, ctx):
        del count
        chosen = jax.random.uniform(ctx.key, y.shape) < flip_share  # [k, n]
        flip = ctx.poisoned[:, None] & chosen
        return x, jnp.where(flip, ctx.flip[y], y)

    def poison_updates(updates, ctx):
        classes = jnp.arange(ctx.flip.shape[0])
        flipped = ctx.flip != classes
        source = jnp.argmax(flipped)  # the first flipped class
        index = head_index[:, source]  # [F]
        rows = updates[:, index]  # [k, F]
        honest_row, _ = benign_moments(rows, ctx.poisoned)
        blended = (1 - row_blend) * rows + row_blend * honest_row[None]  # [k, F]
        blended = replace_rows(rows, blended, ctx.poisoned)
        blended = jnp.where(flipped.any(), blended, rows)
        return updates.at[:, index].set(blended)

    return Attack(poison_data, poison_updates, "flip")
