"""Targeted attacks on a class's rare examples and on a boosted, stealthy update.

Edge-case backdoor (Wang et al., "Attack of the tails: yes, you really can backdoor
federated learning", NeurIPS 2020): the attacker relabels examples from the tail of the
input distribution, which the honest clients rarely hold, so that their updates hardly
pull against it. The paper brings its own tail sets (Southwest airplanes, Ardis digits);
here the tail is drawn from the data the attacker has: of each source class of
`attack.flips`, the share of its own examples farthest (in pixels) from its own mean image
of that class, a fixed low-density subset of the class. They are labelled with the
flip's target; the rest of its data stays clean.

Alternating minimization (Bhagoji et al., "Analyzing federated learning through an
adversarial lens", ICML 2019): the attacker alternates steps on the malicious objective,
boosted by lambda, and steps on a stealth objective that keeps its update near the
benign update (which it estimates by the previous global change). A vmapped round trains
every client with one objective, so the two are simplified: the malicious objective is
training on its data with the source classes' labels flipped (share `share`), and the
alternation between the boosted update and the benign estimate is solved in closed form
(see alt_min). Shapes: [k] clients, [n] examples of a client, [d] parameters, [C] classes.
"""

import jax
import jax.numpy as jnp

from fedjax_poison.attacks.base import Attack, check, clean_updates, previous_update, replace_rows
from fedjax_poison.attacks.model_poisoning import finite


def tail_examples(x, y, count, flip) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(source [k, n] bool, rank [k, n] int32, size [k, n] int32): which real examples
    belong to a flipped class; each one's rank among its client's examples of that class by
    squared pixel distance to their mean, farthest first (ties by position); how many
    examples of its class its client holds."""
    k, n = y.shape
    num_classes = flip.shape[0]
    real = jnp.arange(n)[None, :] < count[:, None]  # [k, n]
    source = real & (flip[y] != y)
    pixels = x.reshape(k, n, -1).astype(jnp.float32)  # [k, n, P]
    classes = jnp.arange(num_classes)[None, None]
    member = (y[..., None] == classes) & source[..., None]  # [k, n, C]
    sizes = member.sum(1)  # [k, C]
    means = jnp.einsum("knc,knp->kcp", member.astype(jnp.float32), pixels)
    means = means / jnp.maximum(sizes, 1)[..., None]  # [k, C, P]
    own_mean = jax.vmap(lambda m, labels: m[labels])(means, y)  # [k, n, P]
    distance = jnp.sum((pixels - own_mean) ** 2, axis=-1)  # [k, n]
    group = jnp.where(source, y, num_classes)  # every other example after the sources
    order = jax.vmap(lambda g, dist: jnp.lexsort((-dist, g)))(group, distance)  # [k, n]
    position = jnp.argsort(order, axis=1)  # where each example sits in its client's order
    first = jnp.cumsum(sizes, axis=1) - sizes  # [k, C]: where each class starts
    rank = position - jnp.take_along_axis(first, jnp.minimum(y, num_classes - 1), axis=1)
    size = jnp.take_along_axis(sizes, y, axis=1)
    return source, rank.astype(jnp.int32), size.astype(jnp.int32)


def edge_case(*, share: float = 0.5) -> Attack:
    """Label the tail of each source class of `attack.flips` with its target: of each
    poisoning client's examples of a source class, the round(share x their count) farthest
    in pixels from their mean (tail_examples). The same examples every round.
    Measured as a flip: the source classes' test images predicted as the target, all of
    them rather than only a test tail, which the paper's own test sets define.
    Knows: its own data and the flips."""
    check(0 < share <= 1, "edge_case.share", "in (0, 1]", share)

    def poison_data(x, y, count, ctx):
        source, rank, size = tail_examples(x, y, count, ctx.flip)
        quota = jnp.round(share * size.astype(jnp.float32))  # [k, n], of the example's class
        hit = ctx.poisoned[:, None] & source & (rank < quota.astype(jnp.int32))
        return x, jnp.where(hit, ctx.flip[y], y)

    return Attack(poison_data, clean_updates, "flip")


def alt_min(*, share: float = 1.0, boost: float = 0.0, rho: float = 1.0) -> Attack:
    """Train with `share` of the source classes' labels flipped (drawn per example and
    round), then send b + boost / (1 + rho) x (u - b): u the trained update, b the benign
    update estimated by the previous round's global change. This is where alternating
    between the boosted malicious objective |v - (b + boost (u - b))|^2 and the stealth
    objective rho |v - b|^2 converges. boost 0: k / the clients poisoning this round
    (Bhagoji et al.'s lambda = 1 / alpha_m); rho 0: explicit boosting alone.
    Knows: its own data and update, the flips, the global model of this round and the
    previous one, k and how many of the round's clients attack."""
    check(0 < share <= 1, "alt_min.share", "in (0, 1]", share)
    ok = finite(boost) and boost >= 0
    check(ok, "alt_min.boost", "a finite number > 0, or 0 for k / attackers", boost)
    check(finite(rho) and rho >= 0, "alt_min.rho", "a finite number >= 0", rho)

    def poison_data(x, y, count, ctx):
        del count
        chosen = jax.random.uniform(ctx.key, y.shape) < share  # [k, n]
        return x, jnp.where(ctx.poisoned[:, None] & chosen, ctx.flip[y], y)

    def poison_updates(updates, ctx):
        k, d = updates.shape
        if boost == 0:
            lam = k / jnp.maximum(ctx.poisoned.sum(), 1).astype(updates.dtype)
        else:
            lam = jnp.asarray(boost, updates.dtype)
        benign = previous_update(ctx, d)[None, :]
        return replace_rows(updates, benign + lam / (1 + rho) * (updates - benign), ctx.poisoned)

    return Attack(poison_data, poison_updates, "flip")
