"""The 2-D convolution every model uses, with its im2col implementation for XLA:CPU.

Padding is PyTorch's symmetric one: 'same' pads k // 2 pixels on every side (the output
is ceil(H / stride) rows, windows centred on pixels 0, s, 2s, ...), 'valid' pads none. At
stride 1 and odd k, 'same' is XLA's 'SAME'; at stride 2 XLA's 'SAME' would pad only the far
side and centre the windows on pixels 1, 3, ..., off the 1 x 1 shortcut of a ResNet.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

_barrier = jax.lax.optimization_barrier  # pins a transposed operand, see _conv_forward

PADDINGS = ("same", "valid")


class Conv(nn.Module):
    """A 2-D convolution with Flax's kernel layout [kh, kw, Cin, Cout] (bias optional)."""

    features: int
    kernel_size: int
    stride: int = 1
    padding: str = "same"
    use_bias: bool = True
    impl: str = "im2col"

    @nn.compact
    def __call__(self, x):  # x: [B, H, W, Cin] -> [B, Ho, Wo, Cout]
        if self.padding not in PADDINGS:
            raise ValueError(f"padding must be one of {PADDINGS}, got {self.padding!r}")
        k, cin = self.kernel_size, x.shape[-1]
        kernel = self.param(
            "kernel", nn.initializers.lecun_normal(), (k, k, cin, self.features), jnp.float32
        )
        pad = k // 2 if self.padding == "same" else 0
        if self.impl == "xla":
            y = jax.lax.conv_general_dilated(
                x,
                kernel,
                (self.stride, self.stride),
                ((pad, pad), (pad, pad)),
                dimension_numbers=("NHWC", "HWIO", "NHWC"),
            )
        else:
            y = _conv(x, kernel, (self.stride, pad, x.shape[1], x.shape[2]))
        if not self.use_bias:
            return y
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32)
        return y + bias.reshape(1, 1, 1, -1)


# The im2col convolution. Inside, the patches are tap-major, [k*k*Cin, M] with M = B*Ho*Wo
# (built by copying whole image rows, which XLA does much faster than interleaving
# channels; a stride takes every s-th row and column of them), and all three products are
# plain (M,K)x(K,N) matmuls:
#   forward  y^T [Cout, M] = W^T [Cout, K] . P [K, M]
#   weights  dW  [K, Cout] = P [K, M] . dy [M, Cout]
#   input    dP  [K, M]    = W [K, Cout] . dy^T [Cout, M], then folded back (col2im).
# XLA would otherwise fold the small transposes into the products, and a product with a
# transposed left operand falls back to a much slower kernel on XLA:CPU.
# geometry: (stride, padding on each side, H, W of the input).


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv(x, kernel, geometry):
    return _conv_forward(x, kernel, geometry)[0]


def _conv_forward(x, kernel, geometry):
    k, _, cin, cout = kernel.shape
    stride, pad, _, _ = geometry
    patches = _patches(jnp.transpose(x, (3, 0, 1, 2)), k, stride, pad)  # [K, B, Ho, Wo]
    _, b, ho, wo = patches.shape
    patches = patches.reshape(k * k * cin, b * ho * wo)
    yt = _barrier(_barrier(kernel.reshape(k * k * cin, cout).T) @ patches)  # [Cout, M]
    return yt.T.reshape(b, ho, wo, cout), (patches, kernel)


def _conv_backward(geometry, residuals, dy):
    patches, kernel = residuals
    k, _, cin, cout = kernel.shape
    b, ho, wo, _ = dy.shape
    dy = dy.reshape(b * ho * wo, cout)
    dkernel = (patches @ dy).reshape(kernel.shape)
    dpatches = kernel.reshape(k * k * cin, cout) @ _barrier(dy.T)  # [K, M]; dead in a 1st layer
    dx = _patches_transpose(dpatches.reshape(k * k * cin, b, ho, wo), k, geometry)
    return jnp.transpose(dx, (1, 2, 3, 0)), dkernel


_conv.defvjp(_conv_forward, _conv_backward)


def _taps(start, count, stride):
    """The slice of the padded axis that tap `start` reads for `count` outputs."""
    return slice(start, start + stride * (count - 1) + 1, stride)


def _patches(x, k, stride, pad):
    """[C, B, H, W] -> [k*k*C, B, Ho, Wo], rows ordered (kh, kw, C) like the kernel.

    Zero padding `pad`; k column shifts, then k row shifts of those (2k copies, not k*k).
    """
    _, _, h, w = x.shape
    ho, wo = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
    xp = jnp.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    rows = jnp.concatenate([xp[..., _taps(j, wo, stride)] for j in range(k)], 0)  # [k*C, B, Hp, Wo]
    return jnp.concatenate([rows[:, :, _taps(i, ho, stride), :] for i in range(k)], 0)


def _patches_transpose(dpatches, k, geometry):
    """The adjoint of _patches (col2im): [k*k*C, B, Ho, Wo] -> [C, B, H, W]."""
    stride, pad, h, w = geometry
    _, b, ho, wo = dpatches.shape
    c, hp, wp = dpatches.shape[0] // (k * k), h + 2 * pad, w + 2 * pad
    dpatches = dpatches.reshape(k, k * c, b, ho, wo)
    rows = _fold([dpatches[i] for i in range(k)], stride, hp, 2)  # [k*C, B, Hp, Wo]
    rows = rows.reshape(k, c, b, hp, wo)
    out = _fold([rows[j] for j in range(k)], stride, wp, 3)  # [C, B, Hp, Wp]
    return out[:, :, pad : pad + h, pad : pad + w]


def _fold(taps, stride, length, axis):
    """The sum over i of taps[i] placed at positions i, i + s, i + 2s, ... of an axis of
    `length` (the adjoint of reading it with _taps).

    Built one phase (positions = r mod s) at a time, each with contiguous adds, and the
    phases interleaved by a reshape: 3-5x faster on XLA:CPU than adding into strided slices.
    """
    count, per_phase = taps[0].shape[axis], -(-length // stride)
    shape = list(taps[0].shape)
    shape[axis] = per_phase
    phases = []
    for r in range(stride):
        acc = jnp.zeros(shape, taps[0].dtype)
        for i in range(r, len(taps), stride):
            acc = acc.at[_along(axis, slice(i // stride, i // stride + count))].add(taps[i])
        phases.append(acc)
    shape[axis] = per_phase * stride
    out = jnp.stack(phases, axis + 1).reshape(shape)  # [..., per_phase, s, ...] interleaved
    return jax.lax.slice_in_dim(out, 0, length, axis=axis)


def _along(axis, index):
    return (slice(None),) * axis + (index,)
