"""Datasets: a registry of specs, each with its loaders and the training recipe it is run with.

A dataset comes from a prepared tensorflow-datasets copy ('tfds'), from the dataset's own
raw files ('files'), or is generated with the same shapes ('synthetic'). Adding a dataset
is one `DatasetSpec` in SPECS (and a config file in configs/ that picks it).
Shapes: [M] dataset size, [C] classes (or channels in image shapes [H, W, C]).
"""

import dataclasses
import os
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_poison.data import raw_files, tfds_source
from fedjax_poison.data.raw_files import DataError

__all__ = ["SOURCES", "SPECS", "DataError", "Dataset", "DatasetSpec", "load_dataset", "normalize"]


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """What a dataset looks like, how to load it, and the setup it is trained with."""

    name: str
    tfds_name: str
    image_shape: tuple[int, int, int]  # (H, W, C)
    num_classes: int
    mean: tuple[float, ...]  # [C] per channel, on pixels scaled to [0, 1]
    std: tuple[float, ...]  # [C]
    class_names: tuple[str, ...]
    default_dir: str  # where its raw files are looked for ('~' is expanded)
    files: tuple[str, ...]  # the raw files, in the order `read_files` takes them
    # (paths, fix) -> (x_train, y_train, x_test, y_test); None: only tfds provides it
    read_files: Callable[[list[str], str], tuple[np.ndarray, ...]] | None
    fix: str  # how a user gets the raw files
    # The training setup its config starts from: the paper's (Tolpegin et al., Section 6)
    # for Fashion-MNIST and CIFAR-10, the same models and schedules for MNIST and CIFAR-100.
    # Keys: model (the `model.` config block), batch_size, lr, momentum, lr_decay_factor,
    # lr_decay_every (in rounds), augment, flips (the default source:target pairs).
    recipe: dict = dataclasses.field(compare=False, hash=False)


_FMNIST_RECIPE = dict(
    model=dict(name="fashion_mnist_cnn", conv_impl="auto"),
    batch_size=4,
    lr=1e-3,
    momentum=0.9,
    lr_decay_factor=0.1,
    lr_decay_every=100,
    augment=False,
    flips="6:0",
)
_CIFAR_RECIPE = dict(
    model=dict(name="cifar10_cnn", conv_impl="auto", softmax_output=False),
    batch_size=10,
    lr=1e-2,
    momentum=0.5,
    lr_decay_factor=0.5,
    lr_decay_every=500,
    augment=True,
    flips="5:3",
)
_CIFAR_URL = "https://www.cs.toronto.edu/~kriz/"
CIFAR100_NAMES = (
    "apple",
    "aquarium_fish",
    "baby",
    "bear",
    "beaver",
    "bed",
    "bee",
    "beetle",
    "bicycle",
    "bottle",
    "bowl",
    "boy",
    "bridge",
    "bus",
    "butterfly",
    "camel",
    "can",
    "castle",
    "caterpillar",
    "cattle",
    "chair",
    "chimpanzee",
    "clock",
    "cloud",
    "cockroach",
    "couch",
    "crab",
    "crocodile",
    "cup",
    "dinosaur",
    "dolphin",
    "elephant",
    "flatfish",
    "forest",
    "fox",
    "girl",
    "hamster",
    "house",
    "kangaroo",
    "keyboard",
    "lamp",
    "lawn_mower",
    "leopard",
    "lion",
    "lizard",
    "lobster",
    "man",
    "maple_tree",
    "motorcycle",
    "mountain",
    "mouse",
    "mushroom",
    "oak_tree",
    "orange",
    "orchid",
    "otter",
    "palm_tree",
    "pear",
    "pickup_truck",
    "pine_tree",
    "plain",
    "plate",
    "poppy",
    "porcupine",
    "possum",
    "rabbit",
    "raccoon",
    "ray",
    "road",
    "rocket",
    "rose",
    "sea",
    "seal",
    "shark",
    "shrew",
    "skunk",
    "skyscraper",
    "snail",
    "snake",
    "spider",
    "squirrel",
    "streetcar",
    "sunflower",
    "sweet_pepper",
    "table",
    "tank",
    "telephone",
    "television",
    "tiger",
    "tractor",
    "train",
    "trout",
    "tulip",
    "turtle",
    "wardrobe",
    "whale",
    "willow_tree",
    "wolf",
    "woman",
    "worm",
)
SPECS: dict[str, DatasetSpec] = {
    "fashion_mnist": DatasetSpec(
        name="fashion_mnist",
        tfds_name="fashion_mnist",
        image_shape=(28, 28, 1),
        num_classes=10,
        mean=(0.0,),  # the paper only scales pixels to [0, 1]
        std=(1.0,),
        class_names=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat")
        + ("Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
        default_dir="/usr/share/datasets/fashion-mnist",  # Debian: dataset-fashion-mnist
        files=raw_files.IDX_FILES,
        read_files=raw_files.read_idx_dataset,
        fix="install them with `apt-get install dataset-fashion-mnist` (into "
        "/usr/share/datasets/fashion-mnist) or download them from "
        "https://github.com/zalandoresearch/fashion-mnist into data.dir",
        recipe=_FMNIST_RECIPE,
    ),
    "mnist": DatasetSpec(
        name="mnist",
        tfds_name="mnist",
        image_shape=(28, 28, 1),
        num_classes=10,
        mean=(0.0,),
        std=(1.0,),
        class_names=tuple(str(d) for d in range(10)),
        default_dir="~/.cache/mnist",
        files=raw_files.IDX_FILES,
        read_files=raw_files.read_idx_dataset,
        fix="download the four *-ubyte.gz files of MNIST (e.g. from "
        "https://ossci-datasets.s3.amazonaws.com/mnist/) into data.dir (default ~/.cache/mnist)",
        recipe={**_FMNIST_RECIPE, "flips": "7:1"},
    ),
    "cifar10": DatasetSpec(
        name="cifar10",
        tfds_name="cifar10",
        image_shape=(32, 32, 3),
        num_classes=10,
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
        class_names=("airplane", "automobile", "bird", "cat", "deer")
        + ("dog", "frog", "horse", "ship", "truck"),
        default_dir="~/.cache/cifar-10-batches-py",
        files=raw_files.CIFAR10_FILES,
        read_files=raw_files.read_cifar10,
        fix=f"download {_CIFAR_URL}cifar-10-python.tar.gz and extract it, so that data.dir "
        "(default ~/.cache/cifar-10-batches-py) holds data_batch_1..5 and test_batch",
        recipe=_CIFAR_RECIPE,
    ),
    "cifar100": DatasetSpec(
        name="cifar100",
        tfds_name="cifar100",
        image_shape=(32, 32, 3),
        num_classes=100,
        mean=(0.507, 0.487, 0.441),
        std=(0.267, 0.256, 0.276),
        class_names=CIFAR100_NAMES,
        default_dir="~/.cache/cifar-100-python",
        files=raw_files.CIFAR100_FILES,
        read_files=raw_files.read_cifar100,
        fix=f"download {_CIFAR_URL}cifar-100-python.tar.gz and extract it, so that data.dir "
        "(default ~/.cache/cifar-100-python) holds train and test",
        recipe={**_CIFAR_RECIPE, "flips": "35:98"},  # girl -> woman
    ),
}
SOURCES = ("auto", "tfds", "files", "synthetic")


class Dataset(NamedTuple):
    x_train: np.ndarray  # [M, H, W, C] uint8
    y_train: np.ndarray  # [M] int32
    x_test: np.ndarray  # [M_test, H, W, C] uint8
    y_test: np.ndarray  # [M_test] int32
    spec: DatasetSpec
    source: str  # the source that provided it: 'tfds' | 'files' | 'synthetic'


def load_dataset(
    name: str,
    source: str = "auto",
    data_dir: str | None = None,
    *,
    synthetic_sizes: tuple[int, int] = (6000, 1000),
    seed: int = 0,
) -> Dataset:
    """The train and test split of dataset `name`, from `source`.

    'tfds': tensorflow-datasets in `data_dir` (default $TFDS_DATA_DIR or ~/tensorflow_datasets),
    downloaded and prepared first if absent. 'files': the raw files in `data_dir` (default
    `spec.default_dir`). 'synthetic': `synthetic_sizes` (train, test) generated examples from
    `seed`. 'auto': 'tfds' if a readable prepared copy exists, else 'files' if they exist,
    else DataError; never 'synthetic'.
    """
    if name not in SPECS:
        raise DataError(f"dataset {name!r} is not one of {sorted(SPECS)}")
    if source not in SOURCES:
        raise DataError(f"data.source {source!r} is not one of {list(SOURCES)}")
    spec, data_dir = SPECS[name], data_dir or None
    if source == "synthetic":
        return synthetic_dataset(spec, *synthetic_sizes, seed=seed)
    if source == "auto":
        if spec.tfds_name and tfds_source.ready(spec.tfds_name, data_dir):
            source = "tfds"
        elif spec.read_files and all(os.path.exists(p) for p in raw_paths(spec, data_dir)):
            source = "files"
        else:
            raise DataError(_how_to_provide(spec, data_dir))
    if (source == "tfds" and not spec.tfds_name) or (source == "files" and not spec.read_files):
        raise DataError(f"data.source={source!r}: dataset {name!r} has no {source} source")
    if source == "tfds":
        arrays = tfds_source.load(spec.tfds_name, data_dir)
    else:
        arrays = _load_files(spec, data_dir)
    for x, y in (arrays[:2], arrays[2:]):
        if x.shape[1:] != spec.image_shape or x.dtype != np.uint8 or len(y) != len(x):
            raise DataError(
                f"{source}: got images {x.shape} {x.dtype} and {len(y)} labels, "
                f"expected uint8 [M, *{spec.image_shape}] and M labels: is it {name}?"
            )
    return Dataset(*arrays, spec=spec, source=source)


def _how_to_provide(spec: DatasetSpec, data_dir: str | None) -> str:
    ways = []
    if spec.tfds_name:
        ways.append(
            "tfds: `pip install -r requirements-tfds.txt`, then data.source=tfds with network "
            "(downloads into $TFDS_DATA_DIR or ~/tensorflow_datasets), or point $TFDS_DATA_DIR "
            "/ data.dir at a prepared copy"
        )
    if spec.read_files and spec.files:
        folder = os.path.dirname(raw_paths(spec, data_dir)[0])
        ways.append(f"files: {spec.fix}; looked in {folder}")
    ways.append("data.source=synthetic: generated stand-in data with the same shapes.")
    listed = "".join(f"\n  {i}. {way}" for i, way in enumerate(ways, 1))
    return f"no {spec.name} data found. Provide it in one of these ways:{listed}"


def raw_paths(spec: DatasetSpec, data_dir: str | None) -> list[str]:
    """Where the raw files are looked for: data_dir (or the default), or the folder of the
    same name as the default inside it (an extracted archive)."""
    if not spec.files:  # a user's loader reads no files
        return []
    root = os.path.expanduser(data_dir or spec.default_dir)
    inner = os.path.join(root, os.path.basename(spec.default_dir))
    if not os.path.exists(os.path.join(root, spec.files[0])) and os.path.isdir(inner):
        root = inner
    return [os.path.join(root, f) for f in spec.files]


def _load_files(spec: DatasetSpec, data_dir: str | None) -> tuple[np.ndarray, ...]:
    """(x_train, y_train, x_test, y_test) from the dataset's own raw files."""
    paths = raw_paths(spec, data_dir)
    fix = f"{spec.fix}; or use data.source=synthetic"
    for path in paths:
        if not os.path.isfile(path):
            raise DataError(f"{path} not found: {fix}")
    arrays = spec.read_files(paths, fix)
    for y in arrays[1::2]:
        if y.min(initial=0) < 0 or y.max(initial=0) >= spec.num_classes:
            raise DataError(f"labels outside [0, {spec.num_classes}) in {paths}: {fix}")
    return tuple(arrays)


# --- synthetic -----------------------------------------------------------------------


def synthetic_dataset(spec: DatasetSpec, num_train: int, num_test: int, seed: int) -> Dataset:
    """A learnable stand-in with the shapes of `spec`, the same for the same seed.

    Each class is a fixed random pattern; an example is its class's pattern, shifted by up
    to 3 pixels, blended with another class's pattern and noised. Classes are balanced.
    """
    t_seq, train_seq, test_seq = np.random.SeedSequence(seed).spawn(3)
    t_rng = np.random.default_rng(t_seq)
    h, w, c = spec.image_shape
    coarse = t_rng.uniform(size=(spec.num_classes, h // 4, w // 4, c))
    templates = coarse.repeat(4, axis=1).repeat(4, axis=2).astype(np.float32)  # [C, H, W, C]
    x_tr, y_tr = _synthetic_split(templates, num_train, np.random.default_rng(train_seq))
    x_te, y_te = _synthetic_split(templates, num_test, np.random.default_rng(test_seq))
    return Dataset(x_tr, y_tr, x_te, y_te, spec=spec, source="synthetic")


def _synthetic_split(templates: np.ndarray, m: int, rng: np.random.Generator):
    num_classes, h, w, _ = templates.shape
    y = rng.permutation(np.arange(m) % num_classes).astype(np.int32)  # [M]
    padded = np.pad(templates, ((0, 0), (3, 3), (3, 3), (0, 0)))
    windows = np.lib.stride_tricks.sliding_window_view(padded, (h, w), axis=(1, 2))
    windows = windows.transpose(0, 1, 2, 4, 5, 3)  # [C, 7, 7, H, W, C]: every shift
    x = np.empty((m, *templates.shape[1:]), np.uint8)
    for start in range(0, m, 4096):  # bounded memory at full dataset sizes
        yc = y[start : start + 4096]
        k = len(yc)
        other = (yc + rng.integers(1, num_classes, k)) % num_classes
        dy, dx = rng.integers(0, 7, (2, k))
        blend = rng.uniform(0.0, 0.5, (k, 1, 1, 1)).astype(np.float32)
        img = (1 - blend) * windows[yc, dy, dx] + blend * templates[other]
        img += rng.normal(0.0, 0.4, img.shape).astype(np.float32)
        x[start : start + k] = np.clip(img * 255.0, 0, 255).astype(np.uint8)
    return x, y


# --- normalization ------------------------------------------------------------------


def normalize(x: jax.Array, spec: DatasetSpec) -> jax.Array:
    """uint8 images [..., H, W, C] -> float32 (x / 255 - mean) / std per channel."""
    shape = (1,) * (x.ndim - 1) + (-1,)
    mean = jnp.asarray(spec.mean, jnp.float32).reshape(shape)
    std = jnp.asarray(spec.std, jnp.float32).reshape(shape)
    return (jnp.asarray(x).astype(jnp.float32) / 255.0 - mean) / std
