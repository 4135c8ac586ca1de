"""Backdoors whose trigger is optimized against the global model, round after round.

A3FL (Zhang et al., "A3FL: Adversarially adaptive backdoor attacks to federated
learning", NeurIPS 2023): a patch pattern, pasted over a fixed square of the image, is
moved each round by signed-gradient (PGD) steps that lower the loss of the target label
on the attackers' triggered images under the current global model, and under a copy of
it adapted to unlearn the trigger (the adversarially adapted model), weighted by how
close that copy stays to the global model.

IBA (Nguyen et al., "IBA: Towards irreversible backdoor attacks in federated learning",
NeurIPS 2023): an imperceptible additive trigger bounded in L_inf by eps, trained against
the global model, and the poisoning update projected onto an L2 ball around the global
model (the authors' PGD with model replacement off). The paper's trigger is the output of
a generator network (input-dependent); here it is one additive pattern, trained by the
same PGD steps as A3FL's and projected onto the eps box.

Both keep their trigger in the server state (Attack.init, Attack.learn), so that it
persists from round to round, is checkpointed with the model and resumes bit for bit, and
the run's triggered test set is built from the current trigger. All attackers of a round
share one trigger, trained on the union of their real examples (they collude, as the
authors' single attacker object does). Shapes: [k] clients, [n] examples of a client,
[S] trigger steps, [B] examples a step, [H, W, C] an image.
"""

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.flatten_util import ravel_pytree

from fedjax_poison.attacks.backdoor import chosen_examples
from fedjax_poison.attacks.base import Attack, check, clean_updates, own_state, replace_rows
from fedjax_poison.attacks.model_poisoning import finite, onto_ball


def step_batches(key, count, poisoned, n: int, steps: int, batch: int) -> jax.Array:
    """[steps, batch] int32: positions in the round's flattened examples [k * n], drawn
    uniformly with replacement from the poisoning clients' real ones (from all positions
    when there are none: see any_examples)."""
    real = (jnp.arange(n)[None, :] < count[:, None]) & poisoned[:, None]  # [k, n]
    weight = real.reshape(-1).astype(jnp.float32)
    weight = jnp.where(weight.sum() > 0, weight, 1.0)
    index = jax.random.choice(key, weight.shape[0], (steps, batch), p=weight / weight.sum())
    return index.astype(jnp.int32)


def signed_descent(loss, pattern, project, lr: float, images, index):
    """pattern after one step per row of index [S, B]: pattern - lr sign(d loss(pattern,
    images[row]) / d pattern), then project(); images [k * n, H, W, C] uint8. A non-finite
    gradient (a diverged global model) moves nothing."""

    def step(pattern, rows):
        grad = jax.grad(loss)(pattern, images[rows].astype(jnp.float32))
        return project(pattern - lr * jnp.nan_to_num(jnp.sign(grad))), None

    return lax.scan(step, pattern, index)[0]


def any_examples(count, ctx) -> jax.Array:
    """[] bool: a poisoning client of the round holds an example (else the trigger stays)."""
    return (ctx.poisoned & (count > 0)).any()


def needs_model(ctx, name: str, *more: str) -> tuple:
    """(params, model_loss, and the context fields `more`) of the context; a clear error
    outside a round that has them."""
    fields = ("params", "model_loss", *more)
    if any(getattr(ctx, field) is None for field in fields):
        raise ValueError(
            f"attack {name} learns from the global model: the context needs {', '.join(fields)}"
        )
    return tuple(getattr(ctx, field) for field in fields)


def patch_mask(size: int, image_shape) -> np.ndarray:
    """[H, W, 1] float32: 1 on the size x size square two pixels from the top-left corner
    (the authors' mask), else 0."""
    h, w, _ = image_shape
    mask = np.zeros((h, w, 1), np.float32)
    mask[2 : 2 + size, 2 : 2 + size] = 1.0
    return mask


def lift(a: jax.Array, x: jax.Array) -> jax.Array:
    """a [H, W, C'] with leading axes of size 1 to broadcast against images x [..., H, W, C]."""
    return a.reshape((1,) * (x.ndim - a.ndim) + a.shape)


def to_pixels(values: jax.Array) -> jax.Array:
    """float32 pixel values [0, 255] -> uint8, rounded."""
    return jnp.clip(jnp.round(values), 0, 255).astype(jnp.uint8)


def a3fl(
    *,
    image_shape: tuple[int, int, int],
    num_classes: int,
    target: int = 2,
    share: float = 0.25,
    size: int = 5,
    lr: float = 0.01,
    steps: int = 10,
    batch: int = 64,
    adapt_steps: int = 5,
    adapt_lr: float = 0.01,
    lam: float = 0.01,
) -> Attack:
    """A3FL: paste the trigger t [H, W, C] in [0, 1] (initially 0.5) over a size x size
    square on `share` of each poisoning client's examples (exactly round(share x count),
    drawn anew each round), labelled `target`. Before that, each round the attackers move
    t by `steps` steps t <- clip(t - lr sign(grad), 0, 1) (pixel units / 255), each on
    `batch` of their examples, of
        L(global, t) + lam cos(global, adapted) L(adapted, t),
    L the cross-entropy of `target` on the triggered batch; `adapted` is the global model
    after `adapt_steps` SGD steps (`adapt_lr`) on triggered examples with their true
    labels (a model that unlearns the trigger), cos the cosine of the two parameter
    vectors. adapt_steps 0: the global model alone.
    Knows: its own data, the global model of the round (and how to apply it), the target.
    """
    h, w, _ = image_shape
    check(0 <= target < num_classes, "a3fl.target", f"in [0, {num_classes})", target)
    check(0 < share <= 1, "a3fl.share", "in (0, 1]", share)
    check(1 <= size <= min(h, w) - 2, "a3fl.size", f"in [1, {min(h, w) - 2}]", size)
    check(finite(lr) and 0 < lr <= 1, "a3fl.lr", "in (0, 1]", lr)
    check(isinstance(steps, int) and steps >= 1, "a3fl.steps", "an integer >= 1", steps)
    check(isinstance(batch, int) and batch >= 1, "a3fl.batch", "an integer >= 1", batch)
    ok = isinstance(adapt_steps, int) and adapt_steps >= 0
    check(ok, "a3fl.adapt_steps", "an integer >= 0", adapt_steps)
    check(finite(adapt_lr) and adapt_lr > 0, "a3fl.adapt_lr", "a finite number > 0", adapt_lr)
    check(finite(lam) and lam >= 0, "a3fl.lam", "a finite number >= 0", lam)
    mask = jnp.asarray(patch_mask(size, image_shape))  # [H, W, 1]

    def paste(t, x):
        """Images x [..., H, W, C] float32 pixels with t pasted over the mask."""
        m = lift(mask, x)
        return m * (255.0 * lift(t, x)) + (1.0 - m) * x

    def init():
        return jnp.full(image_shape, 0.5, jnp.float32)

    def search(x, y, count, ctx):
        params, model_loss = needs_model(ctx, "a3fl")
        k, n = y.shape
        images, labels = x.reshape(k * n, *x.shape[2:]), y.reshape(k * n)
        t = own_state(a3fl_attack, ctx)
        k_trigger, k_adapt = jax.random.split(jax.random.fold_in(ctx.key, 0x7A16))
        goal = jnp.full((batch,), target, jnp.int32)
        loss = lambda t, xb: model_loss(params, paste(t, xb), goal)
        if adapt_steps:
            adapt_index = step_batches(k_adapt, count, ctx.poisoned, n, adapt_steps, batch)
            adapted, weight = adapt(params, model_loss, t, images, labels, adapt_index)
            loss = lambda t, xb: (
                model_loss(params, paste(t, xb), goal)
                + lam * weight * model_loss(adapted, paste(t, xb), goal)
            )
        index = step_batches(k_trigger, count, ctx.poisoned, n, steps, batch)
        return signed_descent(loss, t, lambda t: jnp.clip(t, 0.0, 1.0), lr, images, index)

    def adapt(params, model_loss, t, images, labels, index):
        """(params after SGD steps on the rows of index [A, B] with the trigger t pasted
        and the true labels, their cosine with params)."""

        def step(p, rows):
            xb = paste(t, images[rows].astype(jnp.float32))
            grad = jax.grad(model_loss)(p, xb, labels[rows])
            return jax.tree.map(lambda a, g: a - adapt_lr * g, p, grad), None

        adapted = lax.scan(step, params, index)[0]
        a, b = ravel_pytree(adapted)[0], ravel_pytree(params)[0]
        cos = a @ b / jnp.maximum(jnp.linalg.norm(a) * jnp.linalg.norm(b), 1e-30)
        return adapted, lax.stop_gradient(cos)

    def learn(x, y, count, ctx):
        t = own_state(a3fl_attack, ctx)
        return lax.cond(any_examples(count, ctx), lambda: search(x, y, count, ctx), lambda: t)

    def poison_data(x, y, count, ctx):
        hit = chosen_examples(y, count, ctx, share)  # [k, n]
        pasted = to_pixels(paste(own_state(a3fl_attack, ctx), x.astype(jnp.float32)))
        return jnp.where(hit[:, :, None, None, None], pasted, x), jnp.where(hit, target, y)

    def trigger(x, t):
        return to_pixels(paste(t, x.astype(jnp.float32)))

    a3fl_attack = Attack(
        poison_data, clean_updates, "backdoor", trigger, target, init=init, learn=learn
    )
    return a3fl_attack


def iba(
    *,
    image_shape: tuple[int, int, int],
    num_classes: int,
    target: int = 0,
    share: float = 0.5,
    eps: float = 0.3,
    test_eps: float = 0.05,
    lr: float = 0.01,
    steps: int = 10,
    batch: int = 64,
    radius: float = 2.0,
) -> Attack:
    """IBA, simplified: add the pattern delta [H, W, C] (|delta| <= eps, pixel units / 255,
    initially 0) to `share` of each poisoning client's examples (exactly
    round(share x count), drawn anew each round), labelled `target`; test images carry
    delta x test_eps / eps (the paper trains at atk_eps and tests at atk_test_eps). Before
    that, each round the attackers move delta by `steps` steps
    delta <- clip(delta - lr sign(grad), -eps, eps), each on `batch` of their examples, of
    the cross-entropy of `target` under the global model. The trained update is then
    projected onto the L2 ball of `radius` around the global model (the authors' PGD eps;
    0: no projection).
    Knows: its own data, the global model of the round (and how to apply it), the target.
    """
    check(0 <= target < num_classes, "iba.target", f"in [0, {num_classes})", target)
    check(0 < share <= 1, "iba.share", "in (0, 1]", share)
    check(finite(eps) and 0 < eps <= 1, "iba.eps", "in (0, 1]", eps)
    check(finite(test_eps) and 0 < test_eps <= eps, "iba.test_eps", f"in (0, eps={eps}]", test_eps)
    check(finite(lr) and 0 < lr <= 1, "iba.lr", "in (0, 1]", lr)
    check(isinstance(steps, int) and steps >= 1, "iba.steps", "an integer >= 1", steps)
    check(isinstance(batch, int) and batch >= 1, "iba.batch", "an integer >= 1", batch)
    check(finite(radius) and radius >= 0, "iba.radius", "a finite number >= 0", radius)

    def add(delta, x):
        """Images x [..., H, W, C] float32 pixels plus delta, clipped to [0, 255]."""
        return jnp.clip(x + 255.0 * lift(delta, x), 0.0, 255.0)

    def init():
        return jnp.zeros(image_shape, jnp.float32)

    def search(x, y, count, ctx):
        params, model_loss = needs_model(ctx, "iba")
        k, n = y.shape
        images = x.reshape(k * n, *x.shape[2:])
        goal = jnp.full((batch,), target, jnp.int32)
        loss = lambda delta, xb: model_loss(params, add(delta, xb), goal)
        key = jax.random.fold_in(ctx.key, 0x1BA)
        index = step_batches(key, count, ctx.poisoned, n, steps, batch)
        project = lambda delta: jnp.clip(delta, -eps, eps)
        return signed_descent(loss, own_state(iba_attack, ctx), project, lr, images, index)

    def learn(x, y, count, ctx):
        delta = own_state(iba_attack, ctx)
        found = any_examples(count, ctx)
        return lax.cond(found, lambda: search(x, y, count, ctx), lambda: delta)

    def poison_data(x, y, count, ctx):
        hit = chosen_examples(y, count, ctx, share)  # [k, n]
        added = to_pixels(add(own_state(iba_attack, ctx), x.astype(jnp.float32)))
        return jnp.where(hit[:, :, None, None, None], added, x), jnp.where(hit, target, y)

    def poison_updates(updates, ctx):
        return replace_rows(updates, onto_ball(updates, radius), ctx.poisoned)

    def trigger(x, delta):
        return to_pixels(add(delta * (test_eps / eps), x.astype(jnp.float32)))

    iba_attack = Attack(poison_data, poison_updates, "backdoor", trigger, target, init, learn)
    return iba_attack
