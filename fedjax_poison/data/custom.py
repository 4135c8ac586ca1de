"""Datasets from a user's code: arrays in memory, a loader function, or a tensorflow-datasets
name, registered by name next to the built-in ones (`fedjax_poison.register_dataset`).

A dataset has no config block of its own (`data.*` is shared by all): its registry entry
is its `DatasetSpec`. A registered dataset is used like a built-in one:
`configuration.paper_config(name)` starts from its `recipe` (by default LeNet-5 with plain
SGD), and data.source 'auto' reads it through its loader ('files') or tfds.
"""

from collections.abc import Callable, Sequence

import numpy as np

from fedjax_poison.data.datasets import SPECS, DatasetSpec
from fedjax_poison.data.raw_files import DataError
from fedjax_poison.registry import RegistryError

# The training setup a user's dataset starts from unless it brings its own: a model that
# takes any image shape, SGD with momentum, no schedule, no flip pairs.
DEFAULT_RECIPE = dict(
    model=dict(name="lenet5"),
    batch_size=32,
    lr=0.01,
    momentum=0.9,
    lr_decay_factor=1.0,
    lr_decay_every=1000,
    augment=False,
    flips="",
)
RECIPE_KEYS = tuple(DEFAULT_RECIPE)
BUILT_IN = tuple(SPECS)

Arrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # x_train, y_train, x_test, y_test


def checked_arrays(name: str, arrays: Sequence, num_classes: int | None = None) -> Arrays:
    """The four arrays as uint8 images [M, H, W, C] and int32 labels [M] in [0, C); a
    grayscale [M, H, W] gains its channel. DataError names what is wrong."""
    if len(arrays) != 4:
        raise DataError(
            f"dataset {name!r}: need (x_train, y_train, x_test, y_test), got {len(arrays)} arrays"
        )
    out = []
    for split, (x, y) in (("train", arrays[:2]), ("test", arrays[2:])):
        x, y = np.asarray(x), np.asarray(y)
        x = x[..., None] if x.ndim == 3 else x
        if x.ndim != 4 or x.dtype != np.uint8 or len(x) == 0:
            raise DataError(
                f"dataset {name!r}: x_{split} must be uint8 images [M, H, W, C] with M >= 1, "
                f"got {x.dtype} {x.shape}"
            )
        if y.shape != (len(x),) or not np.issubdtype(y.dtype, np.integer):
            raise DataError(
                f"dataset {name!r}: y_{split} must be {len(x)} integer labels, got "
                f"{y.dtype} {y.shape}"
            )
        out += [x, y.astype(np.int32)]
    if out[0].shape[1:] != out[2].shape[1:]:
        raise DataError(
            f"dataset {name!r}: train images {out[0].shape[1:]} and test images "
            f"{out[2].shape[1:]} differ in shape"
        )
    top = num_classes if num_classes is not None else int(max(out[1].max(), out[3].max())) + 1
    for y in (out[1], out[3]):
        if y.min() < 0 or y.max() >= top:
            raise DataError(f"dataset {name!r}: labels must lie in [0, {top})")
    return tuple(out)


def channel_moments(x: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std [C] of uint8 images scaled to [0, 1] (std at least 1e-3)."""
    scaled = x.reshape(-1, x.shape[-1]).astype(np.float64) / 255.0
    return tuple(scaled.mean(0).tolist()), tuple(np.maximum(scaled.std(0), 1e-3).tolist())


def make_spec(
    name: str,
    *,
    image_shape: Sequence[int],
    num_classes: int,
    load: Callable[[], Sequence] | None = None,
    tfds_name: str = "",
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    class_names: Sequence[str] | None = None,
    recipe: dict | None = None,
) -> DatasetSpec:
    """A DatasetSpec for a user's dataset, read by `load()` (-> the four arrays) and/or from
    tfds as `tfds_name`. mean/std per channel on [0, 1] pixels: by default 0.5 and 0.5
    (pixels mapped to [-1, 1]). recipe: DEFAULT_RECIPE's keys, any of them overridden."""
    if not (isinstance(name, str) and name.isidentifier()):
        raise RegistryError(f"a dataset name must be an identifier, got {name!r}")
    if load is None and not tfds_name:
        raise RegistryError(f"dataset {name!r}: give a loader, arrays or a tfds name")
    shape = tuple(int(s) for s in image_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise RegistryError(f"dataset {name!r}: image_shape must be (H, W, C), got {shape}")
    channels = shape[-1]
    mean = tuple(mean) if mean is not None else (0.5,) * channels
    std = tuple(std) if std is not None else (0.5,) * channels
    if len(mean) != channels or len(std) != channels or min(std) <= 0:
        raise RegistryError(f"dataset {name!r}: mean and std need {channels} values, std > 0")
    names = tuple(class_names) if class_names is not None else tuple(map(str, range(num_classes)))
    if num_classes < 2 or len(names) != num_classes:
        raise RegistryError(
            f"dataset {name!r}: num_classes must be >= 2 with one name each, got "
            f"{num_classes} and {len(names)} names"
        )
    unknown = sorted(set(recipe or {}) - set(RECIPE_KEYS))
    if unknown:
        raise RegistryError(
            f"dataset {name!r}: recipe key {unknown[0]!r} is not one of {list(RECIPE_KEYS)}"
        )

    def read_files(paths, fix):  # no files: the loader is the source
        return checked_arrays(name, load(), num_classes)

    return DatasetSpec(
        name=name,
        tfds_name=tfds_name,
        image_shape=shape,
        num_classes=num_classes,
        mean=mean,
        std=std,
        class_names=names,
        default_dir="",
        files=(),
        read_files=read_files if load is not None else None,
        fix=f"dataset {name!r} is read by its loader",
        recipe={**DEFAULT_RECIPE, **(recipe or {})},
    )


def from_arrays(name: str, x_train, y_train, x_test, y_test, **kwargs) -> DatasetSpec:
    """A spec for arrays in memory; image shape, classes (max label + 1) and the channel
    mean/std come from them unless given."""
    arrays = checked_arrays(name, (x_train, y_train, x_test, y_test), kwargs.get("num_classes"))
    mean, std = channel_moments(arrays[0])
    kwargs = {"mean": mean, "std": std, **kwargs}
    kwargs.setdefault("num_classes", int(max(arrays[1].max(), arrays[3].max())) + 1)
    return make_spec(name, image_shape=arrays[0].shape[1:], load=lambda: arrays, **kwargs)


def register(spec: DatasetSpec, *, replace: bool = False) -> DatasetSpec:
    """Adds `spec` under its name. A built-in dataset is replaced only with replace=True; a
    user's may be registered again (the latest wins)."""
    if spec.name in BUILT_IN and not replace:
        raise RegistryError(f"dataset {spec.name!r} is built in; pass replace=True to replace it")
    SPECS[spec.name] = spec
    return spec
