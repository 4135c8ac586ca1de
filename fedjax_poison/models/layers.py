"""The layers every model is built from, in two implementations of the same parameters.

`conv_impl` picks how the layers are computed; parameters and results are the same
('auto': im2col on a CPU, XLA's own elsewhere):
- 'xla': the reference formulation, `lax.conv_general_dilated`, Flax's BatchNorm,
  GroupNorm and Dense, and `reduce_window` max-pooling. For accelerators.
- 'im2col': the XLA:CPU fast path. Each layer has a hand-written backward, so that
  a training step is a few large matrix products in the layouts XLA:CPU's matmul
  library takes as they are, plus cheap copies (benchmarks/README.md has the measurements).
The kernels: the convolution in `conv.py`, the normalizations in `norms.py`, dense and
max-pool here.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from fedjax_poison.models.conv import Conv
from fedjax_poison.models.norms import BatchNorm, GroupNorm

HEAD = "head"
CONV_IMPLS = ("auto", "im2col", "xla")
NORMS = ("batch", "group", "none")

_barrier = jax.lax.optimization_barrier  # pins a transposed operand, see conv._conv_forward


@jax.custom_vjp
def _max_pool(x):
    """2x2 max-pool, stride 2, over [B, H, W, C]; H and W even (see Layers.max_pool)."""
    a, b, c, d = _windows(x)
    return jnp.maximum(jnp.maximum(a, b), jnp.maximum(c, d))


def _max_pool_forward(x):
    y = _max_pool(x)
    return y, (x, y)


def _max_pool_backward(residuals, dy):
    # Like reduce_window's gradient (and PyTorch's): all of it to the first maximum of a window.
    x, y = residuals
    taken = jnp.zeros(y.shape, bool)
    parts = []
    for member in _windows(x):
        first = (member == y) & ~taken
        taken = taken | first
        parts.append(jnp.where(first, dy, 0.0))
    a, b, c, d = parts
    bsz, h2, w2, ch = y.shape
    grid = jnp.stack([jnp.stack([a, b], 3), jnp.stack([c, d], 3)], 2)  # [B, H/2, 2, W/2, 2, C]
    return (grid.reshape(bsz, 2 * h2, 2 * w2, ch),)


_max_pool.defvjp(_max_pool_forward, _max_pool_backward)


def _windows(x):
    """The members of every 2x2 window of [B, H, W, C], in row-major window order."""
    b, h, w, c = x.shape
    grid = x.reshape(b, h // 2, 2, w // 2, 2, c)
    return [grid[:, :, i, :, j, :] for i in range(2) for j in range(2)]


class Dense(nn.Module):
    """nn.Dense's variables and arithmetic; its kernel gradient as a plain matmul (see conv)."""

    features: int

    @nn.compact
    def __call__(self, x):  # x: [B, F] -> [B, features]
        kernel = self.param(
            "kernel", nn.initializers.lecun_normal(), (x.shape[-1], self.features), jnp.float32
        )
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32)
        return _dense(x, kernel) + bias.reshape(1, -1)


@jax.custom_vjp
def _dense(x, kernel):
    return x @ kernel


def _dense_forward(x, kernel):
    return x @ kernel, (x, kernel)


def _dense_backward(residuals, dy):
    x, kernel = residuals
    return jax.lax.dot_general(dy, kernel, (((1,), (1,)), ((), ()))), _barrier(x.T) @ dy


_dense.defvjp(_dense_forward, _dense_backward)


def resolve_impl(impl: str) -> str:
    """'auto' -> 'im2col' on a CPU, 'xla' on accelerators; ValueError for an unknown one."""
    if impl not in CONV_IMPLS:
        raise ValueError(f"conv_impl must be one of {CONV_IMPLS}, got {impl!r}")
    if impl == "auto":
        return "im2col" if jax.default_backend() == "cpu" else "xla"
    return impl


class Layers:
    """The layer implementations of one `conv_impl` (see the module docstring)."""

    def __init__(self, impl: str, train: bool):
        self.impl, self.train = resolve_impl(impl), train

    def conv(self, features, kernel_size, stride=1, padding="same", use_bias=True):
        """A Conv module; padding 'same' (k // 2 on every side) or 'valid' (see conv.py)."""
        return Conv(features, kernel_size, stride, padding, use_bias, self.impl)

    def norm(self, kind, x, mask, groups=2):
        """`kind` in NORMS: 'batch', 'group' (`groups` groups) or 'none' (x itself)."""
        if kind == "batch":
            return self.batch_norm(x, mask)
        if kind == "group":
            return self.group_norm(x, groups)
        if kind == "none":
            return x
        raise ValueError(f"norm must be one of {NORMS}, got {kind!r}")

    def batch_norm(self, x, mask):
        if self.impl == "xla":
            spatial = None if mask is None else jnp.broadcast_to(mask[:, None, None, None], x.shape)
            bn = nn.BatchNorm(use_running_average=not self.train, momentum=0.9, epsilon=1e-5)
            return bn(x, mask=spatial)
        return BatchNorm(use_running_average=not self.train)(x, mask)

    def group_norm(self, x, groups):
        if self.impl == "xla":
            return nn.GroupNorm(num_groups=groups, epsilon=1e-5)(x)
        return GroupNorm(groups)(x)

    def dense(self, features, name=None):
        return nn.Dense(features, name=name) if self.impl == "xla" else Dense(features, name=name)

    def max_pool(self, x):
        """2x2 max-pool, stride 2; an odd row or column count keeps a last partial window
        (PyTorch's ceil_mode): 7 x 7 -> 4 x 4."""
        _, h, w, _ = x.shape
        pad = ((0, 0), (0, h % 2), (0, w % 2), (0, 0))
        if self.impl == "xla":
            return nn.max_pool(x, (2, 2), strides=(2, 2), padding=pad[1:3])
        if h % 2 or w % 2:
            x = jnp.pad(x, pad, constant_values=-jnp.inf)
        return _max_pool(x)
