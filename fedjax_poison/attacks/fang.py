"""Fang et al.'s local model poisoning (USENIX Security 2020), written against one rule
each: every poisoning client of a round sends an update crafted so that the rule's
aggregate moves against the direction the known updates point.

The paper crafts local models w = w_global + update; here the attack crafts updates
(`delta = local - global`), which is the same for Krum (w_Re = w_global: the paper's
-lambda * s is the update) and reads the trimmed-mean attack's ranges on the update
values, as FLPoison and Shejwalkar & Houmansadr's code do on gradients. s = sign of the
known updates' mean, per coordinate: the direction the model is about to move.
Shapes: [k] clients of the round, [d] flattened parameters.
"""

import jax
import jax.numpy as jnp
from jax import lax

from fedjax_poison.attacks.base import (
    Attack,
    check,
    check_knowledge,
    clean_data,
    known_rows,
    moments,
    replace_rows,
)
from fedjax_poison.attacks.collusion import squared_distances


def krum_scores(d2: jax.Array, alive: jax.Array, num_byzantine: jax.Array) -> jax.Array:
    """Krum's scores [m] over squared distances d2 [m, m] among the alive rows: the sum
    over the m' - f - 2 nearest other alive rows (at least 1); +inf where not alive."""
    m = alive.shape[0]
    others = alive[None, :] & ~jnp.eye(m, dtype=bool)
    ordered = jnp.sort(jnp.where(others, d2, jnp.inf), axis=1)
    n = alive.sum()
    count = jnp.clip(n - num_byzantine - 2, 1, jnp.maximum(n - 1, 1))
    take = jnp.arange(m)[None, :] < count
    return jnp.where(alive, jnp.sum(jnp.where(take, ordered, 0.0), axis=1), jnp.inf)


def lambda_bound(updates, known, c) -> jax.Array:
    """Fang et al.'s upper bound on lambda [] from the known updates (m = known + c rows,
    w_Re = the global model, so D(w_i, w_Re) = |update_i|):
    1 / ((m - 2c - 1) sqrt(d)) min_i sum_{l in the m - c - 2 nearest} D(w_l, w_i)
    + 1 / sqrt(d) max_i |update_i|; the first term dropped when m - 2c - 1 <= 0."""
    d = updates.shape[1]
    n = known.sum()
    dist = jnp.sqrt(squared_distances(updates))
    others = known[None, :] & ~jnp.eye(known.shape[0], dtype=bool)
    ordered = jnp.sort(jnp.where(others, dist, jnp.inf), axis=1)
    take = jnp.arange(known.shape[0])[None, :] < n - 2  # m - c - 2 = n - 2
    near = jnp.min(jnp.where(known, jnp.sum(jnp.where(take, ordered, 0.0), axis=1), jnp.inf))
    spread = (n + c - 2 * c - 1).astype(jnp.float32)
    first = jnp.where((spread > 0) & (n > 2), near / jnp.maximum(spread, 1.0), 0.0)
    size = jnp.sqrt(jnp.sum(updates * updates, axis=1))
    return (first + jnp.max(jnp.where(known, size, 0.0))) / jnp.sqrt(jnp.float32(d))


def fang_krum(*, halvings: int = 20, knowledge: str = "honest") -> Attack:
    """Fang et al.'s attack on Krum: every poisoning client sends -lambda * s, with lambda
    the largest of lambda_0, lambda_0 / 2, ... (`halvings` + 1 values; lambda_0 the paper's
    upper bound) for which Krum (f = the c clients poisoning) picks the crafted update
    among the known updates and its c copies; the smallest tried if none is picked (the
    paper stops below 1e-5). Knows: the round's honest updates ('honest', the paper's full
    knowledge) or the poisoning clients' own before-attack updates ('own', its partial
    knowledge), and how many clients poison."""
    ok = isinstance(halvings, int) and 0 <= halvings <= 60
    check(ok, "fang_krum.halvings", "an integer in [0, 60]", halvings)
    check_knowledge("fang_krum", knowledge)

    def poison_updates(updates, ctx):
        k = updates.shape[0]
        known = known_rows(ctx.poisoned, knowledge)
        c = ctx.poisoned.sum()
        s = jnp.sign(moments(updates, known)[0])
        lam0 = lambda_bound(updates, known, c)
        alive = jnp.concatenate([known, ctx.poisoned])  # known rows, then c copies

        def picked(lam):
            rows = jnp.concatenate([updates, jnp.broadcast_to(-lam * s, updates.shape)])
            scores = krum_scores(squared_distances(rows), alive, c)
            return jnp.min(scores[k:]) <= jnp.min(scores[:k])

        def step(t, chosen):
            lam = lam0 * 0.5**t
            return jnp.where(jnp.isnan(chosen) & picked(lam), lam, chosen)

        chosen = lax.fori_loop(0, halvings + 1, step, jnp.float32(jnp.nan))
        lam = jnp.where(jnp.isnan(chosen), lam0 * 0.5**halvings, chosen)
        return replace_rows(updates, -lam * s, ctx.poisoned)

    return Attack(clean_data, poison_updates, "untargeted")


def fang_trim(*, b: float = 2.0, knowledge: str = "honest") -> Attack:
    """Fang et al.'s attack on the trimmed mean (and the median): per coordinate j, where
    s_j < 0 (the model is about to go down) each poisoning client sends a value drawn
    uniformly in [max_j, b max_j] (max_j > 0) or [max_j, max_j / b] (max_j <= 0) of the
    known updates; elsewhere in [min_j / b, min_j] (min_j > 0) or [b min_j, min_j]. Each
    client and coordinate draws its own value.

    'own' (the paper's partial knowledge): the range is [mu_j + 3 sigma_j, mu_j + 4 sigma_j]
    where s_j < 0, else [mu_j - 4 sigma_j, mu_j - 3 sigma_j], mu and sigma from the
    poisoning clients' own updates. Knows: as `fang_krum`."""
    check(b > 1 and b < float("inf"), "fang_trim.b", "a finite number > 1", b)
    check_knowledge("fang_trim", knowledge)

    def poison_updates(updates, ctx):
        known = known_rows(ctx.poisoned, knowledge)
        mean, std = moments(updates, known)
        down = mean < 0  # s_j = -1: push the coordinate up
        top = jnp.max(jnp.where(known[:, None], updates, -jnp.inf), axis=0)
        low = jnp.min(jnp.where(known[:, None], updates, jnp.inf), axis=0)
        if knowledge == "honest":
            up_range = (top, jnp.where(top > 0, b * top, top / b))
            down_range = (jnp.where(low > 0, low / b, b * low), low)
        else:
            up_range = (mean + 3 * std, mean + 4 * std)
            down_range = (mean - 4 * std, mean - 3 * std)
        lo = jnp.where(down, up_range[0], down_range[0])
        hi = jnp.where(down, up_range[1], down_range[1])
        u = jax.random.uniform(ctx.key, updates.shape, updates.dtype)
        crafted = lo[None, :] + u * (hi - lo)[None, :]
        return replace_rows(updates, crafted, ctx.poisoned)

    return Attack(clean_data, poison_updates, "untargeted")
