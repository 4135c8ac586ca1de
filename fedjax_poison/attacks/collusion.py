"""Colluding model poisoning: every poisoning client of a round sends one update crafted
from the updates the attackers know (`knowledge`: the honest ones, or their own).

Papers write these attacks for gradients, which descend; an update here is
`delta = local - global`, which the server adds, about -lr x a gradient. A formula linear
in the updates (IPM, ALIE's mean) keeps its form; a fixed direction (ALIE's and MinMax's
standard deviation, which is >= 0 either way) changes sign. Each docstring gives the
formula in updates. Shapes: [k] clients of the round, [d] flattened parameters.
"""

import jax
import jax.numpy as jnp
from jax import lax
from jax.scipy.special import ndtri

from fedjax_poison.attacks.base import (
    Attack,
    check,
    check_knowledge,
    clean_data,
    known_rows,
    moments,
    replace_rows,
)
from fedjax_poison.attacks.model_poisoning import finite

PERTURBATIONS = ("unit_vec", "std", "sign")


def alie_z(k: int, num_poisoned: jax.Array) -> jax.Array:
    """ALIE's z_max for n = k clients of which m poison: s = floor(n/2 + 1) - m,
    z = Phi^-1((n - s) / n) (Baruch et al., NeurIPS 2019, Algorithm 3)."""
    s = jnp.floor(k / 2 + 1) - num_poisoned
    return ndtri(jnp.clip((k - s) / k, 1e-6, 1 - 1e-6))


def alie(*, z: float = -1.0, knowledge: str = "honest") -> Attack:
    """A little is enough (Baruch et al., NeurIPS 2019): send mean - z * std of the known
    updates, coordinate-wise (std with n - 1). In gradients that is mean + z * std, as in
    Shejwalkar & Houmansadr's `lie_attack`: close enough to the mean to pass as honest,
    yet shifting every coordinate the same way.

    z -1: the paper's z_max from the round's k clients and the m of them poisoning.
    Knows: the round's honest updates ('honest', omniscient), or only the poisoning
    clients' own trained updates ('own', the paper's threat model); see base.KNOWLEDGE.
    """
    check(finite(z) and (z >= 0 or z == -1), "alie.z", ">= 0, or -1 for z_max", z)
    check_knowledge("alie", knowledge)

    def poison_updates(updates, ctx):
        mean, std = moments(updates, known_rows(ctx.poisoned, knowledge))
        k = updates.shape[0]
        zz = alie_z(k, ctx.poisoned.sum()) if z == -1 else z
        return replace_rows(updates, mean - zz * std, ctx.poisoned)

    return Attack(clean_data, poison_updates, "untargeted")


def ipm(*, epsilon: float = 0.5, knowledge: str = "honest") -> Attack:
    """Inner product manipulation (Xie, Koyejo & Gupta, UAI 2019, "Fall of Empires"): send
    -epsilon x the mean of the known updates, so that the aggregate's inner product with
    the true mean turns small or negative. Knows: the round's honest updates ('honest',
    the paper's omniscient attacker) or the poisoning clients' own ('own')."""
    check(finite(epsilon) and epsilon > 0, "ipm.epsilon", "a finite number > 0", epsilon)
    check_knowledge("ipm", knowledge)

    def poison_updates(updates, ctx):
        mean, _ = moments(updates, known_rows(ctx.poisoned, knowledge))
        return replace_rows(updates, -epsilon * mean, ctx.poisoned)

    return Attack(clean_data, poison_updates, "untargeted")


def squared_distances(x: jax.Array) -> jax.Array:
    """Pairwise squared Euclidean distances of the rows of x [k, d] -> [k, k], without a
    [k, k, d] intermediate (k = 50 CIFAR-10 updates would take 5.5 GB)."""
    sq = jnp.sum(x * x, axis=1)
    return jnp.maximum(sq[:, None] + sq[None, :] - 2.0 * (x @ x.T), 0.0)


def perturbation(kind: str, mean: jax.Array, std: jax.Array) -> jax.Array:
    """The direction p [d] the crafted update mean + gamma * p moves along, in updates.

    The paper's inverse unit vector -mean/|mean| and inverse sign -sign(mean) keep their
    form; its inverse standard deviation -std of gradients is +std of updates.
    """
    if kind == "unit_vec":
        return -mean / jnp.maximum(jnp.linalg.norm(mean), 1e-30)
    if kind == "sign":
        return -jnp.sign(mean)
    return std


def optimize_gamma(fits, gamma_init: float, iters: int) -> jax.Array:
    """The largest gamma tried with fits(gamma) (0 if none), by Shejwalkar & Houmansadr's
    halving search: try gamma_init, then move up or down by half the last step. Their
    code stops once the step is below 1e-5, which from gamma_init 10 is 20 tries."""

    def step(_, carry):
        gamma, step_size, best = carry
        ok = fits(gamma)
        best = jnp.where(ok, jnp.maximum(best, gamma), best)
        gamma = jnp.where(ok, gamma + step_size / 2, gamma - step_size / 2)
        return gamma, step_size / 2, best

    init = (jnp.float32(gamma_init), jnp.float32(gamma_init), jnp.float32(0.0))
    return lax.fori_loop(0, iters, step, init)[2]


def distance_bound(rule: str, pair: jax.Array, rows: jax.Array) -> jax.Array:
    """[] What the crafted update's distances must stay within, from the known rows [k]:
    min_max, the largest squared distance between two of them; min_sum, the smallest sum
    of squared distances of one of them to the others (the authors' released code)."""
    both = rows[:, None] & rows[None, :]
    if rule == "min_max":
        return jnp.max(jnp.where(both, pair, 0.0))
    sums = jnp.sum(jnp.where(both, pair, 0.0), axis=1)  # [k]
    return jnp.min(jnp.where(rows, sums, jnp.inf))


def _min_max_or_sum(rule, kind, gamma_init, iters, knowledge) -> Attack:
    check(kind in PERTURBATIONS, f"{rule}.perturbation", f"one of {PERTURBATIONS}", kind)
    ok = finite(gamma_init) and gamma_init > 0
    check(ok, f"{rule}.gamma_init", "a finite number > 0", gamma_init)
    ok = isinstance(iters, int) and 1 <= iters <= 100
    check(ok, f"{rule}.iters", "an integer in [1, 100]", iters)
    check_knowledge(rule, knowledge)

    def poison_updates(updates, ctx):
        rows = known_rows(ctx.poisoned, knowledge)
        mean, std = moments(updates, rows)
        direction = perturbation(kind, mean, std)
        bound = distance_bound(rule, squared_distances(updates), rows)

        def fits(gamma):
            crafted = mean + gamma * direction
            d2 = jnp.where(rows, jnp.sum((updates - crafted[None]) ** 2, axis=-1), 0.0)
            return (jnp.max(d2) if rule == "min_max" else jnp.sum(d2)) <= bound

        gamma = optimize_gamma(fits, gamma_init, iters)
        return replace_rows(updates, mean + gamma * direction, ctx.poisoned)

    return Attack(clean_data, poison_updates, "untargeted")


def min_max(
    *,
    perturbation: str = "std",
    gamma_init: float = 10.0,
    iters: int = 20,
    knowledge: str = "honest",
) -> Attack:
    """MinMax (Shejwalkar & Houmansadr, NDSS 2021): send mean + gamma * p, the known updates'
    mean moved along `perturbation` p ('unit_vec', 'std' or 'sign'; see perturbation()),
    with the largest gamma whose largest squared distance to a known update stays within
    the largest squared distance between two known updates.
    Knows: the round's honest updates ('honest', the paper's full knowledge) or the
    poisoning clients' own ('own', its "unknown benign gradients")."""
    return _min_max_or_sum("min_max", perturbation, gamma_init, iters, knowledge)


def min_sum(
    *,
    perturbation: str = "std",
    gamma_init: float = 10.0,
    iters: int = 20,
    knowledge: str = "honest",
) -> Attack:
    """MinSum (Shejwalkar & Houmansadr, NDSS 2021): as MinMax, with the largest gamma whose
    sum of squared distances to the known updates stays within the smallest such sum of a
    known update (so the crafted update sits nearer their mean than any of them).
    Knows: as MinMax."""
    return _min_max_or_sum("min_sum", perturbation, gamma_init, iters, knowledge)
