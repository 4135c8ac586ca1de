"""The layers every model is built from, in two implementations of the same parameters.

`conv_impl` picks how the layers are computed; parameters and results are the same
('auto': im2col on a CPU, XLA's own elsewhere):
- 'xla': the reference formulation, `lax.conv_general_dilated`, Flax's BatchNorm and
  `reduce_window` max-pooling. For accelerators.
- 'im2col': the XLA:CPU fast path. Each layer has a hand-written backward, so that
  a training step is a few large matrix products in the layouts XLA:CPU's matmul
  library takes as they are, plus cheap copies (benchmarks/README.md has the measurements).
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

HEAD = "head"

_barrier = jax.lax.optimization_barrier  # pins a transposed operand, see _conv_forward


class Conv(nn.Module):
    """A 'same'-padded, stride-1 2-D convolution with Flax's kernel layout [kh, kw, Cin, Cout]."""

    features: int
    kernel_size: int
    impl: str = "im2col"

    @nn.compact
    def __call__(self, x):  # x: [B, H, W, Cin] -> [B, H, W, Cout]
        k, cin = self.kernel_size, x.shape[-1]
        kernel = self.param(
            "kernel", nn.initializers.lecun_normal(), (k, k, cin, self.features), jnp.float32
        )
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32)
        if self.impl == "xla":
            y = jax.lax.conv_general_dilated(
                x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
            )
        else:
            y = _conv(x, kernel)
        return y + bias.reshape(1, 1, 1, -1)


# The im2col convolution. Inside, the patches are tap-major, [k*k*Cin, M] with M = B*H*W
# (built by copying whole image rows, which XLA does much faster than interleaving
# channels), and all three products are plain (M,K)x(K,N) matmuls:
#   forward  y^T [Cout, M] = W^T [Cout, K] . P [K, M]
#   weights  dW  [K, Cout] = P [K, M] . dy [M, Cout]
#   input    dP  [K, M]    = W [K, Cout] . dy^T [Cout, M], then folded back (col2im).
# XLA would otherwise fold the small transposes into the products, and a product with a
# transposed left operand falls back to a much slower kernel on XLA:CPU.


@jax.custom_vjp
def _conv(x, kernel):
    return _conv_forward(x, kernel)[0]


def _conv_forward(x, kernel):
    k, _, cin, cout = kernel.shape
    b, h, w, _ = x.shape
    patches = _patches(jnp.transpose(x, (3, 0, 1, 2)), k).reshape(k * k * cin, b * h * w)
    yt = _barrier(_barrier(kernel.reshape(k * k * cin, cout).T) @ patches)  # [Cout, M]
    return yt.T.reshape(b, h, w, cout), (patches, kernel)


def _conv_backward(residuals, dy):
    patches, kernel = residuals
    k, _, cin, cout = kernel.shape
    b, h, w, _ = dy.shape
    dy = dy.reshape(b * h * w, cout)
    dkernel = (patches @ dy).reshape(kernel.shape)
    dpatches = kernel.reshape(k * k * cin, cout) @ _barrier(dy.T)  # [K, M]; dead in a 1st layer
    dx = _patches_transpose(dpatches.reshape(k * k * cin, b, h, w), k)
    return jnp.transpose(dx, (1, 2, 3, 0)), dkernel


_conv.defvjp(_conv_forward, _conv_backward)


def _patches(x, k):
    """[C, B, H, W] -> [k*k*C, B, H, W], rows ordered (kh, kw, C) like the kernel.

    'Same' zero padding; k column shifts, then k row shifts of those (2k copies, not k*k).
    """
    _, _, h, w = x.shape
    p = k // 2
    xp = jnp.pad(x, ((0, 0), (0, 0), (p, p), (p, p)))
    rows = jnp.concatenate([xp[..., j : j + w] for j in range(k)], 0)  # [k*C, B, H+2p, W]
    return jnp.concatenate([rows[:, :, i : i + h, :] for i in range(k)], 0)


def _patches_transpose(dpatches, k):
    """The adjoint of _patches (col2im): [k*k*C, B, H, W] -> [C, B, H, W]."""
    _, b, h, w = dpatches.shape
    c, p = dpatches.shape[0] // (k * k), k // 2
    dpatches = dpatches.reshape(k, k * c, b, h, w)
    rows = jnp.zeros((k * c, b, h + 2 * p, w), dpatches.dtype)
    for i in range(k):
        rows = rows.at[:, :, i : i + h, :].add(dpatches[i])
    rows = rows.reshape(k, c, b, h + 2 * p, w)
    out = jnp.zeros((c, b, h + 2 * p, w + 2 * p), dpatches.dtype)
    for j in range(k):
        out = out.at[..., j : j + w].add(rows[j])
    return out[:, :, p : p + h, p : p + w]


class BatchNorm(nn.Module):
    """Flax's BatchNorm (same variables, statistics and running averages) over [B, H, W, C].

    Training mode has a hand-written backward: one pass for the two statistics and one
    for the two sums the gradient needs, where autodiff of Flax's version makes several.
    PyTorch's defaults: running-average momentum 0.1 (Flax counts 1 - that), eps 1e-5.
    """

    use_running_average: bool
    momentum: float = 0.9
    epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x, mask=None):  # x: [B, H, W, C], mask: [B] bool (None = all real)
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (c,), jnp.float32)
        ra_var = self.variable("batch_stats", "var", jnp.ones, (c,), jnp.float32)
        if self.use_running_average:
            return _normalize(
                x, ra_mean.value, jax.lax.rsqrt(ra_var.value + self.epsilon), scale, bias
            )
        weight = jnp.ones(x.shape[0], x.dtype) if mask is None else mask.astype(x.dtype)
        y, mean, var = _batch_norm_train(x, scale, bias, weight, self.epsilon)
        if not self.is_initializing():
            ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
            ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
        return y


def _normalize(x, mean, rstd, scale, bias):
    row = lambda v: v.reshape(1, 1, 1, -1)
    return (x - row(mean)) * row(rstd * scale) + row(bias)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _batch_norm_train(x, scale, bias, weight, epsilon):
    """(y, batch mean, batch var); statistics over the examples with weight 1 (weight: [B])."""
    return _batch_norm_forward(x, scale, bias, weight, epsilon)[0]


def _batch_norm_forward(x, scale, bias, weight, epsilon):
    w = weight.reshape(-1, 1, 1, 1)
    n = jnp.maximum(weight.sum() * (x.shape[1] * x.shape[2]), 1.0)
    wx = w * x
    mean = wx.sum((0, 1, 2)) / n
    var = jnp.maximum(0.0, (wx * x).sum((0, 1, 2)) / n - mean * mean)  # Flax's fast variance
    rstd = jax.lax.rsqrt(var + epsilon)
    y = _normalize(x, mean, rstd, scale, bias)
    return (y, mean, var), (x, scale, w / n, mean, rstd)


def _batch_norm_backward(epsilon, residuals, cotangents):
    x, scale, w_n, mean, rstd = residuals
    dy, dmean, dvar = cotangents
    row = lambda v: v.reshape(1, 1, 1, -1)
    centered = x - row(mean)
    xhat = centered * row(rstd)
    dbias, dscale = dy.sum((0, 1, 2)), (dy * xhat).sum((0, 1, 2))
    # d/dx of (x - mean) * rstd, with mean and var over the weighted examples only.
    dxhat_mean = w_n * (row(scale * dbias) + xhat * row(scale * dscale))
    dx = row(rstd) * (dy * row(scale) - dxhat_mean)
    dx = dx + w_n * (row(dmean) + 2.0 * centered * row(dvar))  # through the returned statistics
    return dx, dscale, dbias, None


_batch_norm_train.defvjp(_batch_norm_forward, _batch_norm_backward)


@jax.custom_vjp
def _max_pool(x):
    """2x2 max-pool, stride 2, over [B, H, W, C]; H and W even."""
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
    """nn.Dense's variables and arithmetic; its kernel gradient as a plain matmul (see _conv)."""

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


CONV_IMPLS = ("auto", "im2col", "xla")


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

    def conv(self, features, kernel_size):
        return Conv(features, kernel_size, self.impl)

    def batch_norm(self, x, mask):
        if self.impl == "xla":
            spatial = None if mask is None else jnp.broadcast_to(mask[:, None, None, None], x.shape)
            bn = nn.BatchNorm(use_running_average=not self.train, momentum=0.9, epsilon=1e-5)
            return bn(x, mask=spatial)
        return BatchNorm(use_running_average=not self.train)(x, mask)

    def dense(self, features, name=None):
        return nn.Dense(features, name=name) if self.impl == "xla" else Dense(features, name=name)

    def max_pool(self, x):
        if self.impl == "xla":
            return nn.max_pool(x, (2, 2), strides=(2, 2))
        return _max_pool(x)
