"""Models: a registry name -> Flax Linen module class (or any factory of a module).

The module's fields with defaults are the config block `model.<name>.*` (`model.name` picks
the member: `--config.model.name=resnet18 --config.model.resnet18.norm=batch`);
`num_classes` comes from the dataset. What every model does (the contract
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
import ml_collections

from fedjax_poison.models.layers import CONV_IMPLS, HEAD
from fedjax_poison.models.paper import Cifar10CNN, FashionMnistCNN
from fedjax_poison.models.zoo import MLP, VGG11, LeNet5, ResNet18
from fedjax_poison.registry import Registry, RegistryError

__all__ = [
    "CONV_IMPLS",
    "HEAD",
    "MODELS",
    "config_block",
    "count_params",
    "default_config",
    "init_variables",
    "input_shape",
    "make_model",
    "register",
    "spec_of",
]

MODELS = Registry(
    "model", "model.name", "model.{name}", sizes=("num_classes",), skip=("parent", "name")
)


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
register("lenet5", LeNet5)
register("mlp", MLP)
register("vgg11", VGG11)
register("resnet18", ResNet18)


def input_shape(name: str) -> tuple[int, int, int] | None:
    """The only image shape model `name` takes, or None for any."""
    return MODELS.member(name).info["input_shape"]


def config_block(name: str) -> dict:
    """The spec of one model with its defaults: {'name': name, **its fields}."""
    return {"name": name, **MODELS.block(name)}


def default_config(name: str, **fields) -> ml_collections.ConfigDict:
    """The `model.` config section: `name`, then every registered model's block
    (`model.<member>.*`), with `fields` set in the block of `name`."""
    c = ml_collections.ConfigDict()
    c.name = name
    for member in MODELS:
        if MODELS.block(member):
            c[member] = ml_collections.ConfigDict(MODELS.block(member))
    for field, value in fields.items():
        if field not in MODELS.block(name):
            raise RegistryError(MODELS.field_message(name, f"{field} is not a field"))
        c[name][field] = value
    return c


def spec_of(section: Mapping[str, Any]) -> dict:
    """The spec {'name': ..., **fields} of the model a `model.` config section names."""
    name = section["name"]
    block = section.get(name) or {}
    return {"name": name, **(block.to_dict() if hasattr(block, "to_dict") else block)}


def make_model(spec: Mapping[str, Any], num_classes: int) -> nn.Module:
    """The model of a spec ({'name': ..., its fields}) for C classes."""
    fields = {k: v for k, v in spec.items() if k != "name"}
    return MODELS.build(spec["name"], fields, num_classes=num_classes)


def init_variables(model: nn.Module, key: jax.Array, image_shape: tuple[int, int, int]):
    """Returns (params, batch_stats) for one model; batch_stats is {} for a model without
    BatchNorm."""
    variables = model.init(key, jnp.zeros((1, *image_shape), jnp.float32), train=False)
    return variables["params"], variables.get("batch_stats", {})


def count_params(params) -> int:
    return sum(p.size for p in jax.tree.leaves(params))


def layer_sizes(params) -> tuple[int, ...]:
    """The size of each parameter array (a kernel, a bias), in the order `ravel_pytree`
    lays them out in the flattened parameters [d]."""
    return tuple(int(p.size) for p in jax.tree.leaves(params))
