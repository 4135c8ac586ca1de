"""Who attacks and when: the malicious clients of an experiment, the rounds they poison."""

import jax
import jax.numpy as jnp
import numpy as np


def draw_malicious(seed: int, num_clients: int, fraction: float) -> np.ndarray:
    """[N] bool: round(fraction * N) malicious clients, drawn once from the seed.

    The same seed draws nested sets: a larger fraction keeps the smaller one's attackers.
    """
    num_malicious = int(round(fraction * num_clients))
    key = jax.random.fold_in(jax.random.key(seed), 0x6D616C)  # a stream of its own
    order = np.asarray(jax.random.permutation(key, num_clients))
    malicious = np.zeros(num_clients, bool)
    malicious[order[:num_malicious]] = True
    return malicious


def poisoning_now(round_index: jax.Array, start: jax.Array, end: jax.Array, every: jax.Array):
    """Whether malicious clients poison in this round (0-based index): inside [start, end)
    and every `every`-th round from start."""
    inside = (round_index >= start) & (round_index < end)
    return inside & ((round_index - start) % jnp.maximum(every, 1) == 0)
