"""Local training of one client: SGD with momentum over its examples.

Written for one client; the round vmaps it over the k selected clients. A client's examples
arrive in a buffer of the round's static width n (the federation's largest client), of which
the first `count` are real. Local work follows one of two conventions:
- epochs (local_steps = 0, the paper's): local_epochs passes over the client's own examples,
  ceil(count / B) steps each, the last batch of an epoch partial;
- fixed steps (local_steps = S > 0, FedJAX's and most cross-device papers'): exactly S full
  batches, the client's examples cycled through in a fresh random order each pass.
With `ragged` set, an epochs client stops after its own steps (a while loop), so that a round
pays for the examples its clients hold, not for the buffer's width.
"""

import math
from collections.abc import Callable
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_poison import data as data_lib
from fedjax_poison.models import layers
from fedjax_poison.round import sharding

# The layers whose input is a model's embedding: Flax's Dense and the project's own.
DENSE = (nn.Dense, layers.Dense)


class TrainSettings(NamedTuple):
    """The static part of local training (one compile per setting)."""

    batch_size: int
    local_epochs: int
    momentum: float
    augment: bool  # random crop (padding 4) + horizontal flip, per example and step
    local_steps: int = 0  # > 0: exactly this many full batches per client and round
    # Epochs over clients of unequal size: each client stops after its own steps. False: every
    # client runs the steps of the buffer's width (the padded layout; equal clients need no more).
    ragged: bool = False


class ClientResult(NamedTuple):
    params: dict
    batch_stats: dict
    loss: jax.Array  # [] mean training loss over the examples the client trained on


def lr_at(step: jax.Array, lr: float, decay_factor: float, decay_every: int, min_lr: float):
    """The paper's step schedule: lr * decay_factor ** (step // decay_every), floored at min_lr."""
    decayed = lr * decay_factor ** (step // decay_every).astype(jnp.float32)
    return jnp.maximum(decayed, min_lr)


def augment_batch(key: jax.Array, x: jax.Array) -> jax.Array:
    """Random crop with zero padding 4 and random horizontal flip, per example. x: [B, H, W, C]."""
    b, h, w, _ = x.shape
    k_crop, k_flip = jax.random.split(key)
    offsets = jax.random.randint(k_crop, (b, 2), 0, 9)
    padded = jnp.pad(x, ((0, 0), (4, 4), (4, 4), (0, 0)))

    def crop(img, off):
        return jax.lax.dynamic_slice(img, (off[0], off[1], 0), (h, w, img.shape[-1]))

    cropped = jax.vmap(crop)(padded, offsets)
    flip = jax.random.bernoulli(k_flip, 0.5, (b,))
    return jnp.where(flip[:, None, None, None], cropped[:, :, ::-1, :], cropped)


def steps_of(count, settings: TrainSettings):
    """Steps a client of `count` examples trains in a round (numpy or jax, elementwise)."""
    if settings.local_steps:
        return (count > 0) * settings.local_steps
    return settings.local_epochs * (-(-count // settings.batch_size))


def max_steps(n: int, settings: TrainSettings) -> int:
    """Steps of the longest client a buffer of width n can hold: the loop's static bound."""
    return int(steps_of(n, settings))


def epoch_orders(key: jax.Array, count: jax.Array, n: int, epochs: int) -> jax.Array:
    """[epochs, n] positions: row e lists the client's `count` examples in a fresh random
    order, then the padding positions (>= count)."""
    keys = jax.random.split(key, epochs)
    noise = jax.vmap(lambda k: jax.random.uniform(k, (n,)))(keys)  # [E, n]
    noise = jnp.where(jnp.arange(n) < count, noise, 2.0 + jnp.arange(n) / n)
    return jnp.argsort(noise, axis=1)


def stream_order(key: jax.Array, count: jax.Array, n: int, length: int) -> jax.Array:
    """[length] positions (< count) of the client's examples passed over again and again,
    each pass in a fresh random order (count >= 1; n >= count the buffer's width)."""
    width = length + n  # whole passes covering `length` positions: ceil(length / count) * count
    q = jnp.arange(width)
    passes = q // jnp.maximum(count, 1)
    noise = jax.random.uniform(key, (width,))
    order = jnp.lexsort((noise, passes))  # by pass, then randomly inside a pass
    return (q % jnp.maximum(count, 1))[order][:length]


def batch_at(step, count, n, orders, settings: TrainSettings):
    """(positions [B], valid [B] bool) of a client's `step`-th batch.

    orders: epoch_orders [E, n] (epochs) or stream_order [S * B] (fixed steps).
    """
    b = settings.batch_size
    if settings.local_steps:
        positions = jax.lax.dynamic_slice(orders, (step * b,), (b,))
        return positions, jnp.broadcast_to(count > 0, (b,))
    per_epoch = jnp.maximum(-(-count // b), 1)
    slot = (step % per_epoch) * b + jnp.arange(b)
    valid = (slot < count) & (step < steps_of(count, settings))
    epoch = jnp.minimum(step // per_epoch, settings.local_epochs - 1)
    return orders[epoch, jnp.minimum(slot, n - 1)], valid


def batch_order(key: jax.Array, count: jax.Array, n: int, settings: TrainSettings):
    """Every step's (positions [steps, B], valid [steps, B] bool) up to the static bound.

    Epochs: epoch e visits the client's `count` real examples in a fresh random order,
    partial last batch masked; fixed steps: full batches of the cycled examples.
    """
    steps = max_steps(n, settings)
    orders = _orders(key, count, n, settings)
    at = lambda s: batch_at(s, count, n, orders, settings)
    return jax.vmap(at)(jnp.arange(steps))


def _orders(key, count, n, settings: TrainSettings):
    if settings.local_steps:
        return stream_order(key, count, n, settings.local_steps * settings.batch_size)
    return epoch_orders(key, count, n, settings.local_epochs)


def make_local_train(
    model: nn.Module,
    spec: data_lib.DatasetSpec,
    settings: TrainSettings,
    devices_in_use: int = 1,
    clients_at_once: int = 0,
) -> Callable[..., ClientResult]:
    """Returns local_train(params, batch_stats, x [n,H,W,C] u8, y [n], count, lr, key).

    Under vmap, clients train `clients_at_once` at a time, one group after the other (0: on
    CPU as many as fit the cache, see sharding.cpu_chunk; elsewhere all at once).
    devices_in_use: how many devices of this process run at once (the run's mesh); on CPU
    they share the cores, which sets how many clients a device trains at once.
    """
    tx_for = lambda lr: optax.sgd(lr, momentum=settings.momentum or None)

    def loss_fn(params, batch_stats, x, y, mask):
        logits, updates = model.apply(
            {"params": params, "batch_stats": batch_stats},
            x,
            train=True,
            mask=mask,
            mutable=["batch_stats"],
        )
        per_example = optax.softmax_cross_entropy_with_integer_labels(logits, y)
        loss = jnp.sum(per_example * mask) / jnp.maximum(mask.sum(), 1)
        return loss, updates["batch_stats"]

    def local_train(params, batch_stats, x, y, count, lr, key) -> ClientResult:
        tx = tx_for(lr)
        k_order, k_aug = jax.random.split(key)
        n = x.shape[0]
        orders = _orders(k_order, count, n, settings)

        def step(s, carry):
            params, batch_stats, opt_state, loss_sum = carry
            idx, mask = batch_at(s, count, n, orders, settings)
            xb = data_lib.normalize(x[idx], spec)  # [B, H, W, C] float32
            if settings.augment:
                xb = augment_batch(jax.random.fold_in(k_aug, s), xb)
            fmask = mask.astype(jnp.float32)
            (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
                params, batch_stats, xb, y[idx], fmask
            )
            updates, new_opt = tx.update(grads, opt_state, params)
            # A batch made only of padding must leave the client untouched.
            any_real = mask.any()
            keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(any_real, a, b), new, old)
            return (
                keep(optax.apply_updates(params, updates), params),
                keep(new_stats, batch_stats),
                keep(new_opt, opt_state),
                loss_sum + loss * fmask.sum(),
            )

        init = (params, batch_stats, tx.init(params), jnp.zeros((), jnp.float32))
        own_steps = steps_of(count, settings)
        bound = (
            own_steps if settings.ragged and not settings.local_steps else max_steps(n, settings)
        )
        params, batch_stats, _, loss_sum = jax.lax.fori_loop(0, bound, step, init)
        trained = (
            own_steps * settings.batch_size
            if settings.local_steps
            else count * settings.local_epochs
        )
        mean_loss = loss_sum / jnp.maximum(trained, 1)
        return ClientResult(params, batch_stats, mean_loss)

    if not clients_at_once:
        values_per_client = settings.batch_size * math.prod(spec.image_shape)  # a step's input
        on_cpu = jax.default_backend() == "cpu"
        clients_at_once = sharding.cpu_chunk(values_per_client, devices_in_use) if on_cpu else 0
    return _vmap_in_chunks(local_train, clients_at_once)


def make_model_loss(model: nn.Module, spec: data_lib.DatasetSpec) -> Callable[..., jax.Array]:
    """Returns loss(batch_stats, params, x [b, H, W, C], y [b]) -> [] the mean cross-entropy
    of the model in evaluation mode; x pixels in [0, 255], uint8 or float32 (then
    differentiable in x): what attacks that learn a trigger descend."""

    def loss(batch_stats, params, x, y):
        logits = model.apply(
            {"params": params, "batch_stats": batch_stats}, data_lib.normalize(x, spec), train=False
        )
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))

    return loss


def make_model_features(model: nn.Module, spec: data_lib.DatasetSpec) -> Callable[..., jax.Array]:
    """Returns features(batch_stats, params, x [b, H, W, C]) -> [b, F]: the input of the
    model's last nn.Dense call (its output layer's, the penultimate embedding) in evaluation
    mode; x pixels in [0, 255], uint8 or float32 (then differentiable in x): what attacks
    that shape the embedding read. Any Flax model whose last layer is a Dense."""

    def features(batch_stats, params, x):
        seen = []  # inputs of the Dense calls, in call order (recorded while tracing)

        def record(next_fun, args, kwargs, context):
            if isinstance(context.module, DENSE) and context.method_name == "__call__":
                seen.append(args[0] if args else next(iter(kwargs.values())))
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(record):
            model.apply(
                {"params": params, "batch_stats": batch_stats},
                data_lib.normalize(x, spec),
                train=False,
            )
        if not seen:
            raise ValueError(f"{type(model).__name__} calls no nn.Dense: it has no embedding")
        return seen[-1]

    return features


def _vmap_in_chunks(fn: Callable, chunk: int) -> Callable:
    """fn, whose vmap is a lax.map over chunks of `chunk` vectorized calls (0: one vmap).

    The same per-element computation as vmap (results agree to float rounding), still one
    compiled program; for at most `chunk` elements, it is vmap.
    """
    fn_vmap = jax.custom_batching.custom_vmap(fn)

    @fn_vmap.def_vmap
    def rule(axis_size, in_batched, *args):
        flat, tree = jax.tree.flatten(args)
        batched = jax.tree.leaves(in_batched)
        if not chunk or chunk >= axis_size:
            axes = jax.tree.unflatten(tree, [0 if b else None for b in batched])
            out = jax.vmap(fn, in_axes=tuple(axes))(*args)
        else:

            def one(xs):
                it = iter(xs)
                full = [next(it) if b else a for a, b in zip(flat, batched)]
                return fn(*jax.tree.unflatten(tree, full))

            xs = [a for a, b in zip(flat, batched) if b]
            out = jax.lax.map(one, xs, batch_size=chunk)
        return out, jax.tree.map(lambda _: True, out)

    return fn_vmap


def round_waste(steps: np.ndarray, clients_at_once: int, bound: int | None = None) -> float:
    """Steps computed / steps that carry data for one round's clients' `steps` [k].

    The round sorts its clients by steps and trains them `clients_at_once` at a time (0: all
    at once), each group until its longest client ends; bound: every client runs this many
    (the padded layout).
    """
    steps = np.sort(np.asarray(steps))[::-1]
    real = max(int(steps.sum()), 1)
    if bound is not None:
        return len(steps) * bound / real
    width = clients_at_once or len(steps)
    computed = sum(int(steps[i]) * len(steps[i : i + width]) for i in range(0, len(steps), width))
    return computed / real
