"""ALIE and IPM with their factor optimized against the rule in use, as ByzFL does
(Allouah et al.'s library, `LineMaximize`): the attackers try factors, each time
aggregating the round's updates with their crafted rows as the server will, and send the
rows of the factor that moved the aggregate farthest from the honest mean.

The search is ByzFL's line maximization: from `start`, expand by steps that double while
the objective grows; once it does not, contract, stepping towards the best factor by
steps shrunk by `ratio`, `evals` evaluations in all. The objective is
|aggregate(updates with the poisoning rows crafted with factor f) - honest mean|.
Shapes: [k] clients of the round, [d] flattened parameters.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

from fedjax_poison.attacks.base import (
    Attack,
    check,
    clean_data,
    known_rows,
    moments,
    replace_rows,
    server_aggregate,
)
from fedjax_poison.attacks.model_poisoning import finite


def below_zero_halved(x: jax.Array, towards: jax.Array) -> jax.Array:
    """x moved halfway to `towards` (>= 0) until it is >= 0 (ByzFL's contraction below 0);
    0 if 64 halvings do not get there (towards = 0)."""

    def halve(carry):
        x, i = carry
        return (x + towards) / 2, i + 1

    x, _ = lax.while_loop(lambda c: (c[0] < 0) & (c[1] < 64), halve, (x, jnp.int32(0)))
    return jnp.maximum(x, 0.0)


def line_maximize(
    objective: Callable[[jax.Array], jax.Array],
    evals: int,
    start: float,
    delta: float,
    ratio: float,
) -> tuple[jax.Array, jax.Array]:
    """(best factor, its objective) [] [] over `evals` evaluations of objective (factor []
    -> []), by ByzFL's LineMaximize: expansion (step doubled while better), then contraction
    (step times `ratio` after every evaluation). A factor is never below 0."""
    x0 = jnp.float32(start)
    y0 = objective(x0)

    def step(_, carry):
        best_x, best_y, prop_x, step_size, expanding = carry
        back = jnp.where(
            prop_x < best_x, prop_x + step_size, below_zero_halved(prop_x - step_size, prop_x)
        )
        x = jnp.where(expanding, best_x + step_size, back)
        y = objective(x)
        better = y > best_y
        step_size = jnp.where(expanding & better, 2 * step_size, step_size * ratio)
        return (
            jnp.where(better, x, best_x),
            jnp.where(better, y, best_y),
            x,
            step_size,
            expanding & better,
        )

    init = (x0, y0, x0, jnp.float32(delta), jnp.bool_(True))
    best_x, best_y, *_ = lax.fori_loop(0, evals - 1, step, init)
    return best_x, best_y


def _check_search(rule: str, evals, start, delta, ratio) -> None:
    ok = isinstance(evals, int) and 1 <= evals <= 100
    check(ok, f"{rule}.evals", "an integer in [1, 100]", evals)
    check(finite(start) and start >= 0, f"{rule}.start", "a finite number >= 0", start)
    check(finite(delta) and delta > 0, f"{rule}.delta", "a finite number > 0", delta)
    check(finite(ratio) and 0.5 < ratio < 1, f"{rule}.ratio", "in (0.5, 1)", ratio)


def _optimized(craft, evals, start, delta, ratio) -> Attack:
    """The attack sending craft(mean, std, factor) [d] of the honest updates, with the
    factor line_maximize finds against the round's rule."""

    def poison_updates(updates, ctx):
        honest = known_rows(ctx.poisoned, "honest")
        mean, std = moments(updates, honest)

        def crafted(factor):
            return replace_rows(updates, craft(mean, std, factor), ctx.poisoned)

        def objective(factor):
            moved = server_aggregate(ctx, crafted(factor)) - mean
            return jnp.sqrt(jnp.sum(moved * moved))

        factor, _ = line_maximize(objective, evals, start, delta, ratio)
        return crafted(factor)

    return Attack(clean_data, poison_updates, "untargeted")


def alie_opt(
    *, evals: int = 16, start: float = 0.0, delta: float = 1.0, ratio: float = 0.8
) -> Attack:
    """ALIE (Baruch et al., NeurIPS 2019) with its factor searched: send mean - z * std of
    the honest updates (mean + z * std in gradients, ByzFL's ALittleIsEnough), z >= 0 the
    factor line_maximize finds against the rule in use (ByzFL's LineMaximize with its
    defaults: 16 evaluations from 0, step 1, contraction 0.8).
    Knows: the round's honest updates, the rule in use and its memory (omniscient, as
    ByzFL's optimizer)."""
    _check_search("alie_opt", evals, start, delta, ratio)
    return _optimized(lambda mean, std, z: mean - z * std, evals, start, delta, ratio)


def ipm_opt(
    *, evals: int = 16, start: float = 0.0, delta: float = 1.0, ratio: float = 0.8
) -> Attack:
    """IPM (Xie et al., UAI 2019) with its factor searched: send -epsilon x the honest
    updates' mean (ByzFL's FallOfEmpires with tau = 1 + epsilon), epsilon >= 0 the factor
    line_maximize finds against the rule in use (defaults as alie_opt).
    Knows: as alie_opt."""
    _check_search("ipm_opt", evals, start, delta, ratio)
    return _optimized(lambda mean, std, eps: -eps * mean, evals, start, delta, ratio)
