"""Which k of the N clients train in a round: random, early/late around a breakpoint, availability.

Every schedule is a traced value of the scenario, so one compiled round serves them all
(and a sweep can mix them along its experiment axis).
"""

import jax
import jax.numpy as jnp

SCHEDULES = ("always", "early", "late", "availability")
ALWAYS, EARLY, LATE, AVAILABILITY = range(len(SCHEDULES))


def pool_rank(noise: jax.Array, pool: jax.Array) -> jax.Array:
    """[N] rank of each pool member by descending noise (0 = first); non-members rank after."""
    order = jnp.argsort(jnp.where(pool, -noise, 2.0))
    return jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0]))


def select_clients(
    key: jax.Array,
    round_index: jax.Array,  # [] int32
    malicious: jax.Array,  # [N] bool
    eligible: jax.Array,  # [N] bool: not blocked by a defense
    schedule: jax.Array,  # [] int32, index into SCHEDULES
    breakpoint: jax.Array,  # [] int32
    alpha: jax.Array,  # [2] float32: availability before / from the breakpoint
    k: int,
) -> jax.Array:
    """[k] int32 distinct client ids, in ascending order.

    always: k uniformly among the eligible. early / late: malicious clients are eligible
    only before / from the breakpoint round. availability: each of the k slots is
    malicious with probability alpha (clipped to what the pools can supply), the slots
    filled uniformly from the malicious and the honest pool, without duplicates.
    """
    k_noise, k_slots = jax.random.split(key)
    before = round_index < breakpoint
    allow_malicious = jnp.where(
        schedule == EARLY, before, jnp.where(schedule == LATE, ~before, True)
    )
    eligible = eligible & (~malicious | allow_malicious)
    noise = jax.random.uniform(k_noise, malicious.shape)

    bad_pool, good_pool = eligible & malicious, eligible & ~malicious
    p = jnp.where(before, alpha[0], alpha[1])
    num_bad = jax.random.bernoulli(k_slots, p, (k,)).sum()
    num_bad = jnp.clip(num_bad, k - good_pool.sum(), bad_pool.sum())
    by_pool = (bad_pool & (pool_rank(noise, bad_pool) < num_bad)) | (
        good_pool & (pool_rank(noise, good_pool) < k - num_bad)
    )
    uniform = eligible & (pool_rank(noise, eligible) < k)
    chosen = jnp.where(schedule == AVAILABILITY, by_pool, uniform)
    return jnp.nonzero(chosen, size=k)[0].astype(jnp.int32)  # exactly k are chosen
