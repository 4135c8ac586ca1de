"""BatchNorm and GroupNorm with hand-written backwards: Flax's variables and arithmetic,
in one pass for the statistics and one for the sums the gradient needs (autodiff of
Flax's versions makes several). PyTorch's defaults: eps 1e-5, BatchNorm's running-average
momentum 0.1 (Flax counts 1 - that).
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp


def _row(v):
    return v.reshape(1, 1, 1, -1)


class BatchNorm(nn.Module):
    """Flax's BatchNorm (same variables, statistics and running averages) over [B, H, W, C]."""

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
    return (x - _row(mean)) * _row(rstd * scale) + _row(bias)


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
    centered = x - _row(mean)
    xhat = centered * _row(rstd)
    dbias, dscale = dy.sum((0, 1, 2)), (dy * xhat).sum((0, 1, 2))
    # d/dx of (x - mean) * rstd, with mean and var over the weighted examples only.
    dxhat_mean = w_n * (_row(scale * dbias) + xhat * _row(scale * dscale))
    dx = _row(rstd) * (dy * _row(scale) - dxhat_mean)
    dx = dx + w_n * (_row(dmean) + 2.0 * centered * _row(dvar))  # through the statistics
    return dx, dscale, dbias, None


_batch_norm_train.defvjp(_batch_norm_forward, _batch_norm_backward)


class GroupNorm(nn.Module):
    """Flax's GroupNorm (Wu & He, 2018): each example's channels in `num_groups` groups, each
    normalized over (H, W, its channels); no batch statistics, so padding needs no mask."""

    num_groups: int
    epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x):  # x: [B, H, W, C], C divisible by num_groups
        c = x.shape[-1]
        if c % self.num_groups:
            raise ValueError(f"{c} channels do not split into {self.num_groups} groups")
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        return _group_norm(x, scale, bias, self.num_groups, self.epsilon)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _group_norm(x, scale, bias, groups, epsilon):
    return _group_norm_forward(x, scale, bias, groups, epsilon)[0]


def _grouped(x, groups):
    b, h, w, c = x.shape
    return x.reshape(b, h * w, groups, c // groups)  # statistics over axes 1 and 3


def _group_norm_forward(x, scale, bias, groups, epsilon):
    xg = _grouped(x, groups)
    mean = xg.mean((1, 3), keepdims=True)  # [B, 1, G, 1]
    var = jnp.maximum(0.0, (xg * xg).mean((1, 3), keepdims=True) - mean * mean)
    rstd = jax.lax.rsqrt(var + epsilon)
    xhat = ((xg - mean) * rstd).reshape(x.shape)
    return xhat * _row(scale) + _row(bias), (xhat, scale, rstd)


def _group_norm_backward(groups, epsilon, residuals, dy):
    xhat, scale, rstd = residuals
    dbias, dscale = dy.sum((0, 1, 2)), (dy * xhat).sum((0, 1, 2))
    g, xg = _grouped(dy * _row(scale), groups), _grouped(xhat, groups)  # d/dxhat, xhat
    mean_g = g.mean((1, 3), keepdims=True)
    mean_gx = (g * xg).mean((1, 3), keepdims=True)
    dx = rstd * (g - mean_g - xg * mean_gx)
    return dx.reshape(dy.shape), dscale, dbias


_group_norm.defvjp(_group_norm_forward, _group_norm_backward)
