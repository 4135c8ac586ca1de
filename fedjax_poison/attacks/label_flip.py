"""Label flipping (Tolpegin et al., ESORICS 2020): a flip table [C] applied through a mask.

Never a function per class pair: `flip_table` maps every class to the label it becomes,
and a poisoning client's labels go through it. The experiment's flip table is a traced
value of its scenario, so one compiled round serves every flip of a sweep.
"""

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_poison.attacks.base import Attack, check, clean_updates

Flips = tuple[tuple[int, int], ...]  # ((source, target), ...)
MAPPINGS = ("pairs", "all_to_one", "all_to_all", "random")


def parse_flips(text: str) -> Flips:
    """'6:0' or '6:0,1:3' -> ((6, 0), (1, 3)); '' -> () (no flip)."""
    text = text.strip()
    if not text:
        return ()
    pairs = []
    for item in text.split(","):
        parts = item.strip().split(":")
        if len(parts) != 2 or not all(p.strip().lstrip("-").isdigit() for p in parts):
            raise ValueError(
                f"attack.flips must look like '6:0' or '6:0,1:3' (source:target), got {text!r}"
            )
        pairs.append((int(parts[0]), int(parts[1])))
    return tuple(pairs)


def format_flips(flips: Flips) -> str:
    return ",".join(f"{s}:{t}" for s, t in flips)


def flip_table(flips: Flips, num_classes: int) -> np.ndarray:
    """[C] int32: the label each class becomes on a poisoned client (identity where not flipped)."""
    table = np.arange(num_classes, dtype=np.int32)
    for source, target in flips:
        table[source] = target
    return table


def mapping_pairs(mapping: str, flips: Flips, target: int, num_classes: int) -> Flips:
    """The (source, target) pairs of a mapping: 'pairs' = `flips`; 'all_to_one': every other
    class -> `target`; 'all_to_all': c -> C-1-c; 'random': none (labels are drawn instead)."""
    if mapping == "pairs":
        return flips
    if mapping == "all_to_one":
        return tuple((c, target) for c in range(num_classes) if c != target)
    if mapping == "all_to_all":
        return tuple(
            (c, num_classes - 1 - c) for c in range(num_classes) if 2 * c + 1 != num_classes
        )
    return ()


def poison_labels(y: jax.Array, flip: jax.Array, poisoned: jax.Array) -> jax.Array:
    """Flips the labels of poisoned clients. y: [k, n] int32, flip: [C], poisoned: [k] bool."""
    return jnp.where(poisoned[:, None], flip[y], y)


def label_flip(*, num_classes: int, mapping: str = "pairs", target: int = 0) -> Attack:
    """Malicious clients train on flipped labels (Tolpegin et al., ESORICS 2020).

    mapping 'pairs': the experiment's `attack.flips` (source:target pairs, sweepable);
    'all_to_one': every class but `target` becomes `target`; 'all_to_all': class c becomes
    C-1-c (Biggio et al.'s all-to-all setting); 'random': every label is drawn uniformly
    (an untargeted attack). Knows: its own data only.
    """
    check(mapping in MAPPINGS, "label_flip.mapping", f"one of {MAPPINGS}", mapping)
    check(0 <= target < num_classes, "label_flip.target", f"in [0, {num_classes})", target)

    def poison_data(x, y, count, ctx):
        del count
        if mapping == "random":
            new = jax.random.randint(ctx.key, y.shape, 0, num_classes, y.dtype)
            return x, jnp.where(ctx.poisoned[:, None], new, y)
        return x, poison_labels(y, ctx.flip, ctx.poisoned)

    return Attack(poison_data, clean_updates, "untargeted" if mapping == "random" else "flip")
