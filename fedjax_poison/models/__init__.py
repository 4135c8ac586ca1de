"""Models: a registry name -> Flax Linen module class (or any factory of a module).

The module's fields with defaults are the `model.*` config block (`model.name` picks the
member); `num_classes` comes from the dataset. What every model does (the contract
`fedjax_poison.testing.check_model` checks):

    model(num_classes=C, **block).apply(variables, x [B, H, W, C_in] float32,
                                        train: bool, mask: [B] bool | None) -> logits [B, C]

with its output layer named `head` (a Dense whose kernel [F, C] holds one column per class:
the defenses read it from the stacked updates), and any BatchNorm statistics in the
`batch_stats` collection (the mask leaves padded examples out of them). A model registered
with `input_shape` takes only images of that shape; without, any shape its layers allow.
"""

from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fedjax_poison.models.layers import CONV_IMPLS, HEAD
from fedjax_poison.models.paper import Cifar10CNN, FashionMnistCNN
from fedjax_poison.registry import Registry

__all__ = [
    "CONV_IMPLS",
    "HEAD",
    "MODELS",
    "config_block",
    "count_params",
    "init_variables",
    "input_shape",
    "make_model",
    "register",
]

MODELS = Registry("model", "model.name", "model", sizes=("num_classes",), skip=("parent", "name"))


def register(
    name: str,
    factory: Callable[..., nn.Module],
    *,
    input_shape: tuple[int, int, int] | None = None,
    replace: bool = False,
) -> Callable[..., nn.Module]:
    """Adds a model: `factory(num_classes=C, **block)` returns a Flax module (a module class
    is such a factory). input_shape (H, W, C): the only images it takes; None: any."""
    shape = None if input_shape is None else tuple(int(s) for s in input_shape)
    return MODELS.register(name, factory, replace=replace, input_shape=shape)


register("fashion_mnist_cnn", FashionMnistCNN, input_shape=(28, 28, 1))
register("cifar10_cnn", Cifar10CNN, input_shape=(32, 32, 3))


def input_shape(name: str) -> tuple[int, int, int] | None:
    """The only image shape model `name` takes, or None for any."""
    return MODELS.member(name).info["input_shape"]


def config_block(name: str) -> dict:
    """The `model.` config block of a model: its name and its fields' defaults."""
    return {"name": name, **MODELS.block(name)}


def make_model(block: Mapping[str, Any], num_classes: int) -> nn.Module:
    """The model of a `model.` config block ({'name': ..., its fields}) for C classes."""
    fields = {k: v for k, v in block.items() if k != "name"}
    return MODELS.build(block["name"], fields, num_classes=num_classes)


def init_variables(model: nn.Module, key: jax.Array, image_shape: tuple[int, int, int]):
    """Returns (params, batch_stats) for one model; batch_stats is {} for a model without
    BatchNorm."""
    variables = model.init(key, jnp.zeros((1, *image_shape), jnp.float32), train=False)
    return variables["params"], variables.get("batch_stats", {})


def count_params(params) -> int:
    return sum(p.size for p in jax.tree.leaves(params))
