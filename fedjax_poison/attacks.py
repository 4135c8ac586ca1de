"""Label flipping: a flip table [C] applied through a mask, never a function per class pair."""

import jax
import jax.numpy as jnp
import numpy as np

Flips = tuple[tuple[int, int], ...]  # ((source, target), ...)


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


def draw_malicious(seed: int, num_clients: int, fraction: float) -> np.ndarray:
    """[N] bool: round(fraction * N) malicious clients, drawn once from the seed."""
    num_malicious = int(round(fraction * num_clients))
    key = jax.random.fold_in(jax.random.key(seed), 0x6D616C)  # a stream of its own
    order = np.asarray(jax.random.permutation(key, num_clients))
    malicious = np.zeros(num_clients, bool)
    malicious[order[:num_malicious]] = True
    return malicious


def poison_labels(y: jax.Array, flip: jax.Array, poisoned: jax.Array) -> jax.Array:
    """Flips the labels of poisoned clients. y: [k, n] int32, flip: [C], poisoned: [k] bool."""
    return jnp.where(poisoned[:, None], flip[y], y)


def poisoning_now(round_index: jax.Array, start: jax.Array, end: jax.Array, every: jax.Array):
    """Whether malicious clients poison in this round: inside [start, end) and every `every`-th."""
    inside = (round_index >= start) & (round_index < end)
    return inside & ((round_index - start) % jnp.maximum(every, 1) == 0)
