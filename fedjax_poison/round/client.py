"""Local training of one client: SGD with momentum over its (padded) examples.

Written for one client; the round vmaps it over the k selected clients.
"""

import math
from collections.abc import Callable
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from fedjax_poison import data as data_lib
from fedjax_poison.round import sharding


class TrainSettings(NamedTuple):
    """The static part of local training (one compile per setting)."""

    batch_size: int
    local_epochs: int
    momentum: float
    augment: bool  # random crop (padding 4) + horizontal flip, per example and step


class ClientResult(NamedTuple):
    params: dict
    batch_stats: dict
    loss: jax.Array  # [] mean training loss over the client's real examples


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


def batch_order(key: jax.Array, count: jax.Array, n: int, settings: TrainSettings) -> jax.Array:
    """Example indices and validity for every step: ([steps, B], [steps, B] bool).

    Epoch e visits the client's `count` real examples in a fresh random order; the
    padding positions (index >= count) fill the tail and are masked out of the loss.
    """
    steps_per_epoch = -(-n // settings.batch_size)
    keys = jax.random.split(key, settings.local_epochs)
    noise = jax.vmap(lambda k: jax.random.uniform(k, (n,)))(keys)  # [E, n]
    noise = jnp.where(jnp.arange(n) < count, noise, 2.0 + jnp.arange(n) / n)
    order = jnp.argsort(noise, axis=1)  # [E, n]
    pad = steps_per_epoch * settings.batch_size - n
    order = jnp.pad(order, ((0, 0), (0, pad)), constant_values=n - 1)
    position = jnp.arange(steps_per_epoch * settings.batch_size)
    valid = jnp.broadcast_to(position < count, order.shape)
    shape = (settings.local_epochs * steps_per_epoch, settings.batch_size)
    return order.reshape(shape), valid.reshape(shape)


def make_local_train(
    model: nn.Module,
    spec: data_lib.DatasetSpec,
    settings: TrainSettings,
    devices_in_use: int = 1,
) -> Callable[..., ClientResult]:
    """Returns local_train(params, batch_stats, x [n,H,W,C] u8, y [n], count, lr, key).

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
        order, valid = batch_order(k_order, count, x.shape[0], settings)

        def step(carry, inputs):
            params, batch_stats, opt_state, loss_sum = carry
            idx, mask, step_key = inputs
            xb = data_lib.normalize(x[idx], spec)  # [B, H, W, C] float32
            if settings.augment:
                xb = augment_batch(step_key, xb)
            fmask = mask.astype(jnp.float32)
            (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
                params, batch_stats, xb, y[idx], fmask
            )
            updates, new_opt = tx.update(grads, opt_state, params)
            # A batch made only of padding must leave the client untouched.
            any_real = mask.any()
            keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(any_real, a, b), new, old)
            carry = (
                keep(optax.apply_updates(params, updates), params),
                keep(new_stats, batch_stats),
                keep(new_opt, opt_state),
                loss_sum + loss * fmask.sum(),
            )
            return carry, None

        step_keys = jax.random.split(k_aug, order.shape[0])
        init = (params, batch_stats, tx.init(params), jnp.zeros((), jnp.float32))
        (params, batch_stats, _, loss_sum), _ = jax.lax.scan(step, init, (order, valid, step_keys))
        mean_loss = loss_sum / jnp.maximum(count * settings.local_epochs, 1)
        return ClientResult(params, batch_stats, mean_loss)

    values_per_client = settings.batch_size * math.prod(spec.image_shape)  # a step's input
    return _vmap_in_chunks(local_train, sharding.cpu_chunk(values_per_client, devices_in_use))


def _vmap_in_chunks(fn: Callable, chunk: int) -> Callable:
    """fn, whose vmap on CPU is a lax.map over chunks of `chunk` vectorized calls.

    The same per-element computation as vmap (results agree to float rounding), still one
    compiled program; on other backends, and for at most `chunk` elements, it is vmap.
    """
    fn_vmap = jax.custom_batching.custom_vmap(fn)

    @fn_vmap.def_vmap
    def rule(axis_size, in_batched, *args):
        flat, tree = jax.tree.flatten(args)
        batched = jax.tree.leaves(in_batched)
        if jax.default_backend() != "cpu" or chunk >= axis_size:
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
