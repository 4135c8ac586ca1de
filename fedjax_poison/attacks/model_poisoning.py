"""Model poisoning: malicious clients send crafted updates instead of what they trained.

Every attack here acts on the update seam: the stacked updates [k, d] after local
training, before the defense; rows of clients not poisoning this round stay as they are.
Each docstring says what the attacker knows. The colluding attacks (ALIE, IPM, MinMax,
MinSum) send one crafted update from every poisoning row.
"""

import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.scipy.special import ndtri

from fedjax_poison.attacks.base import (
    Attack,
    benign_moments,
    check,
    clean_data,
    replace_rows,
)

PERTURBATIONS = ("unit_vec", "std", "sign")
INF_VALUES = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf, "huge": 1e20}


def _finite(value: float) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def sign_flip(*, factor: float = 1.0) -> Attack:
    """Send -factor x the trained update (Damaskinos et al., ICML 2018; Allen-Zhu et al.,
    ICLR 2021). Knows: its own update."""
    check(_finite(factor) and factor > 0, "sign_flip.factor", "a finite number > 0", factor)

    def poison_updates(updates, ctx):
        return replace_rows(updates, -factor * updates, ctx.poisoned)

    return Attack(clean_data, poison_updates, "untargeted")


def gaussian(*, mean: float = 0.0, std: float = 1.0) -> Attack:
    """Send Gaussian noise N(mean, std^2) in every coordinate (Blanchard et al., NeurIPS
    2017). Knows: nothing."""
    check(_finite(mean), "gaussian.mean", "a finite number", mean)
    check(_finite(std) and std >= 0, "gaussian.std", "a finite number >= 0", std)

    def poison_updates(updates, ctx):
        noise = mean + std * jax.random.normal(ctx.key, updates.shape, updates.dtype)
        return replace_rows(updates, noise, ctx.poisoned)

    return Attack(clean_data, poison_updates, "untargeted")


def scale(*, factor: float = 10.0) -> Attack:
    """Send factor x the trained update: boosting, or model replacement when factor is the
    number of clients a round averages (Bagdasaryan et al., AISTATS 2020). Chained after a
    data attack ('backdoor+scale') it boosts the poisoned update. Knows: its own update."""
    check(_finite(factor) and factor > 0, "scale.factor", "a finite number > 0", factor)

    def poison_updates(updates, ctx):
        return replace_rows(updates, factor * updates, ctx.poisoned)

    return Attack(clean_data, poison_updates, "untargeted")


def alie_z(k: int, num_poisoned: jax.Array) -> jax.Array:
    """ALIE's z_max for n = k clients of which f poison: s = floor(n/2 + 1) - f,
    z = Phi^-1((n - s) / n) (Baruch et al., NeurIPS 2019, Algorithm 3)."""
    s = jnp.floor(k / 2 + 1) - num_poisoned
    return ndtri(jnp.clip((k - s) / k, 1e-6, 1 - 1e-6))


def alie(*, z: float = -1.0, clients_per_round: int) -> Attack:
    """A little is enough (Baruch et al., NeurIPS 2019): send mean - z * std, coordinate-wise,
    of the honest updates, small enough to pass as honest yet shifting every coordinate.

    z -1: the paper's z_max from the round's k clients and how many of them poison.
    Knows: the round's honest updates (colluding, omniscient).
    """
    check(_finite(z) and (z >= 0 or z == -1), "alie.z", ">= 0, or -1 for z_max", z)

    def poison_updates(updates, ctx):
        mean, std = benign_moments(updates, ctx.poisoned)
        zz = alie_z(clients_per_round, ctx.poisoned.sum()) if z == -1 else jnp.float32(z)
        return replace_rows(updates, mean - zz * std, ctx.poisoned)

    return Attack(clean_data, poison_updates, "untargeted")


def ipm(*, epsilon: float = 0.5) -> Attack:
    """Inner product manipulation (Xie et al., UAI 2020): send -epsilon x the mean of the
    honest updates, so that the aggregate's inner product with the true one turns small or
    negative. Knows: the round's honest updates (colluding, omniscient)."""
    check(_finite(epsilon) and epsilon > 0, "ipm.epsilon", "a finite number > 0", epsilon)

    def poison_updates(updates, ctx):
        mean, _ = benign_moments(updates, ctx.poisoned)
        return replace_rows(updates, -epsilon * mean, ctx.poisoned)

    return Attack(clean_data, poison_updates, "untargeted")


def squared_distances(x: jax.Array) -> jax.Array:
    """Pairwise squared Euclidean distances of the rows of x [k, d] -> [k, k], without a
    [k, k, d] intermediate (k = 50 CIFAR-10 updates would take 5.5 GB)."""
    sq = jnp.sum(x * x, axis=1)
    return jnp.maximum(sq[:, None] + sq[None, :] - 2.0 * (x @ x.T), 0.0)


def perturbation(kind: str, mean: jax.Array, std: jax.Array) -> jax.Array:
    """The direction [d] a MinMax/MinSum attacker moves away from the honest mean along."""
    if kind == "unit_vec":
        return -mean / jnp.maximum(jnp.linalg.norm(mean), 1e-30)
    if kind == "std":
        return -std
    return -jnp.sign(mean)


def _optimize_gamma(fits, gamma_init: float, iters: int) -> jax.Array:
    """The largest gamma in [0, 2 gamma_init) with fits(gamma), by the paper's halving
    search (Shejwalkar & Houmansadr, NDSS 2021, Algorithm 1); 0 if none fits."""

    def step(_, carry):
        gamma, step_size, best = carry
        ok = fits(gamma)
        best = jnp.where(ok, jnp.maximum(best, gamma), best)
        gamma = jnp.where(ok, gamma + step_size / 2, gamma - step_size / 2)
        return gamma, step_size / 2, best

    init = (jnp.float32(gamma_init), jnp.float32(gamma_init), jnp.float32(0.0))
    return lax.fori_loop(0, iters, step, init)[2]


def _min_max_or_sum(kind: str, rule: str, gamma_init: float, iters: int) -> Attack:
    check(kind in PERTURBATIONS, f"{rule}.perturbation", f"one of {PERTURBATIONS}", kind)
    check(_finite(gamma_init) and gamma_init > 0, f"{rule}.gamma_init", "> 0", gamma_init)
    check(isinstance(iters, int) and 1 <= iters <= 100, f"{rule}.iters", "in [1, 100]", iters)

    def poison_updates(updates, ctx):
        honest = ~ctx.poisoned
        mean, std = benign_moments(updates, ctx.poisoned)
        direction = perturbation(kind, mean, std)
        pair = squared_distances(updates)  # [k, k]
        both = honest[:, None] & honest[None, :]
        if rule == "min_max":  # the largest distance between two honest updates
            bound = jnp.max(jnp.where(both, pair, 0.0))
        else:  # the largest sum of squared distances of an honest update to the others
            bound = jnp.max(jnp.where(honest, jnp.sum(jnp.where(both, pair, 0.0), 1), 0.0))

        def fits(gamma):
            crafted = mean + gamma * direction
            d2 = jnp.where(honest, jnp.sum((updates - crafted[None]) ** 2, axis=-1), 0.0)
            return (jnp.max(d2) if rule == "min_max" else jnp.sum(d2)) <= bound

        gamma = _optimize_gamma(fits, gamma_init, iters)
        return replace_rows(updates, mean + gamma * direction, ctx.poisoned)

    return Attack(clean_data, poison_updates, "untargeted")


def min_max(*, perturbation: str = "std", gamma_init: float = 10.0, iters: int = 30) -> Attack:
    """MinMax (Shejwalkar & Houmansadr, NDSS 2021): the honest mean moved along
    `perturbation` ('unit_vec', 'std' or 'sign') as far as its largest distance to an honest
    update stays within the largest distance between two honest updates.
    Knows: the round's honest updates (colluding, omniscient)."""
    return _min_max_or_sum(perturbation, "min_max", gamma_init, iters)


def min_sum(*, perturbation: str = "std", gamma_init: float = 10.0, iters: int = 30) -> Attack:
    """MinSum (Shejwalkar & Houmansadr, NDSS 2021): as MinMax, bounding the sum of squared
    distances to the honest updates by the largest such sum of an honest update.
    Knows: the round's honest updates (colluding, omniscient)."""
    return _min_max_or_sum(perturbation, "min_sum", gamma_init, iters)


def inf(*, value: str = "nan") -> Attack:
    """Send an update of NaN, +inf, -inf or 1e20 in every coordinate ('huge': finite, but
    its norm overflows float32): the hostile input every server must survive.
    Knows: nothing."""
    check(value in INF_VALUES, "inf.value", f"one of {tuple(INF_VALUES)}", value)

    def poison_updates(updates, ctx):
        return replace_rows(updates, jnp.float32(INF_VALUES[value]), ctx.poisoned)

    return Attack(clean_data, poison_updates, "untargeted")
