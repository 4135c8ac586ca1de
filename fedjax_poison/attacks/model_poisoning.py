"""Model poisoning by one client at a time: it sends a crafted update instead of what it
trained, knowing at most its own update.

Every attack here acts on the update seam: the stacked updates [k, d] after local
training, before the server guard and the defense; rows of clients not poisoning this
round stay as they are. The colluding attacks, which read the other rows, are in
collusion.py.
"""

import math

import jax
import jax.numpy as jnp

from fedjax_poison.attacks.base import Attack, check, clean_data, replace_rows

INF_VALUES = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf, "huge": 1e20}


def finite(value) -> bool:
    """A finite Python number (not a bool)."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    return number and math.isfinite(value)


def onto_ball(updates: jax.Array, radius: float) -> jax.Array:
    """updates [..., d], each scaled onto the L2 ball of `radius` (0: as they are)."""
    if not radius:
        return updates
    norm = jnp.sqrt(jnp.sum(updates * updates, axis=-1, keepdims=True))
    return updates * jnp.minimum(1.0, radius / jnp.maximum(norm, 1e-30))


def sign_flip(*, factor: float = 1.0) -> Attack:
    """Send -factor x the trained update (Damaskinos et al., ICML 2018; Allen-Zhu et al.,
    ICLR 2021). Knows: its own update."""
    check(finite(factor) and factor > 0, "sign_flip.factor", "a finite number > 0", factor)

    def poison_updates(updates, ctx):
        return replace_rows(updates, -factor * updates, ctx.poisoned)

    return Attack(clean_data, poison_updates, "untargeted")


def gaussian(*, mean: float = 0.0, std: float = 1.0) -> Attack:
    """Send Gaussian noise N(mean, std^2) in every coordinate, drawn per client and round
    (Blanchard et al., NeurIPS 2017). A large std is a huge but finite update that the
    server guard lets through. Knows: nothing."""
    check(finite(mean), "gaussian.mean", "a finite number", mean)
    check(finite(std) and std >= 0, "gaussian.std", "a finite number >= 0", std)

    def poison_updates(updates, ctx):
        noise = mean + std * jax.random.normal(ctx.key, updates.shape, updates.dtype)
        return replace_rows(updates, noise, ctx.poisoned)

    return Attack(clean_data, poison_updates, "untargeted")


def scale(*, factor: float = 10.0) -> Attack:
    """Send factor x the trained update: boosting (Bhagoji et al., ICML 2019) or model
    replacement (Bagdasaryan et al., AISTATS 2020). Chained after a data attack
    ('backdoor+scale') it boosts the poisoned update.

    factor 0: model replacement, gamma = k / f with f the clients poisoning this round:
    FedAvg's mean of the k updates becomes the attackers' mean update plus 1/k of the honest
    ones, which the paper expects to nearly cancel (its gamma = n / eta with server
    learning rate eta = 1, shared by the f attackers). Knows: its own update, k, and how
    many of the round's clients attack.
    """
    ok = finite(factor) and factor >= 0
    check(ok, "scale.factor", "a finite number > 0, or 0 for model replacement", factor)

    def poison_updates(updates, ctx):
        if factor == 0:
            k = updates.shape[0]
            gamma = k / jnp.maximum(ctx.poisoned.sum(), 1).astype(updates.dtype)
        else:
            gamma = factor
        return replace_rows(updates, gamma * updates, ctx.poisoned)

    return Attack(clean_data, poison_updates, "untargeted")


def inf(*, value: str = "nan") -> Attack:
    """Send an update of NaN, +inf, -inf or 1e20 in every coordinate ('huge': finite, but
    its norm overflows float32): the hostile input every server must survive; the server
    guard drops (and flags) it whatever the rule. Knows: nothing."""
    check(value in INF_VALUES, "inf.value", f"one of {tuple(INF_VALUES)}", value)

    def poison_updates(updates, ctx):
        return replace_rows(updates, jnp.asarray(INF_VALUES[value], updates.dtype), ctx.poisoned)

    return Attack(clean_data, poison_updates, "untargeted")
