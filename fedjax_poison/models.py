"""The paper's CNNs (Tolpegin et al., Tables 5 and 6) as Flax Linen modules.

Both models name their output layer `head`; the defenses read its kernel
([F, C]: one column of F weights per class) from the stacked client updates.
"""

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

HEAD = "head"


class Conv(nn.Module):
    """A 'same'-padded, stride-1 2-D convolution with Flax's kernel layout [kh, kw, Cin, Cout].

    `impl='im2col'` writes the convolution as shifted slices + one matmul. On XLA:CPU its
    weight gradient inside `lax.scan` is many times faster than `lax.conv` (which takes
    a slow path there), and vmapped over clients it stays a batched matmul instead of a
    grouped convolution. `impl='xla'` is `lax.conv_general_dilated`, for accelerators.
    """

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
            y = _im2col(x, k) @ kernel.reshape(k * k * cin, self.features)
        return y + bias.reshape(1, 1, 1, -1)


def _im2col(x, k):
    """[B, H, W, Cin] -> [B, H, W, k*k*Cin] patches, ordered (kh, kw, Cin) like the kernel."""
    _, h, w, _ = x.shape
    p = k // 2
    xp = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
    return jnp.concatenate(
        [xp[:, i : i + h, j : j + w, :] for i in range(k) for j in range(k)], axis=-1
    )


def _max_pool(x):
    return nn.max_pool(x, (2, 2), strides=(2, 2))


def _batch_norm(train: bool):
    # PyTorch's BatchNorm2d defaults: running-average momentum 0.1 (Flax counts 1 - that), eps 1e-5.
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5)


class FashionMnistCNN(nn.Module):
    """Table 6: 2 x (conv 5x5 -> BatchNorm -> ReLU -> max-pool 2) -> dense 10; 29,034 params."""

    conv_impl: str = "im2col"

    @nn.compact
    def __call__(self, x, train: bool = False, mask=None):  # x: [B, 28, 28, 1] float
        for features in (16, 32):
            x = Conv(features, 5, self.conv_impl)(x)
            x = _batch_norm(train)(x, mask=_spatial(mask, x))
            x = _max_pool(nn.relu(x))
        x = x.reshape(x.shape[0], -1)  # [B, 1568]
        return nn.Dense(10, name=HEAD)(x)


class Cifar10CNN(nn.Module):
    """Table 5: 3 x (2 x (conv 3x3 -> ReLU -> BatchNorm) -> max-pool 2) -> dense 128 -> dense 10.

    551,466 params. `softmax_output=True` reproduces the original code, whose last layer
    ends in a softmax that the cross-entropy then applies a second time.
    """

    conv_impl: str = "im2col"
    softmax_output: bool = False

    @nn.compact
    def __call__(self, x, train: bool = False, mask=None):  # x: [B, 32, 32, 3] float
        for features in (32, 64, 128):
            for _ in range(2):
                x = nn.relu(Conv(features, 3, self.conv_impl)(x))
                x = _batch_norm(train)(x, mask=_spatial(mask, x))
            x = _max_pool(x)
        x = x.reshape(x.shape[0], -1)  # [B, 2048]
        x = nn.Dense(128)(x)
        x = nn.Dense(10, name=HEAD)(x)
        return nn.softmax(x) if self.softmax_output else x


def _spatial(mask, x):
    """Broadcasts a per-example mask [B] to BatchNorm's [B, H, W, C]."""
    if mask is None:
        return None
    return jnp.broadcast_to(mask[:, None, None, None], x.shape)


MODELS: dict[str, Callable[..., nn.Module]] = {
    "fashion_mnist_cnn": FashionMnistCNN,
    "cifar10_cnn": Cifar10CNN,
}


def make_model(name: str, **kwargs: Any) -> nn.Module:
    """Builds a registered model by name."""
    if name not in MODELS:
        raise ValueError(f"model.name must be one of {sorted(MODELS)}, got {name!r}")
    return MODELS[name](**kwargs)


def init_variables(model: nn.Module, key: jax.Array, image_shape: tuple[int, int, int]):
    """Returns (params, batch_stats) for one model."""
    variables = model.init(key, jnp.zeros((1, *image_shape), jnp.float32), train=False)
    return variables["params"], variables["batch_stats"]


def count_params(params) -> int:
    return sum(p.size for p in jax.tree.leaves(params))
