"""Datasets, their normalization, and their split among clients.

A dataset comes from a prepared tensorflow-datasets copy ('tfds'), from the dataset's own
raw files ('files'), or is generated with the same shapes ('synthetic').
Shapes: [M] dataset size, [N] clients, [n] examples per client, [C] classes (or channels
in image shapes [H, W, C]).
"""

import dataclasses
import gzip
import importlib.util
import os
import pickle
import zlib
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class DataError(ValueError):
    """The data cannot be provided as asked; the message says how to provide it."""


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """What a dataset looks like, and where its raw files are looked for by default."""

    name: str
    tfds_name: str
    image_shape: tuple[int, int, int]  # (H, W, C)
    num_classes: int
    mean: tuple[float, ...]  # [C] per channel, on pixels scaled to [0, 1]
    std: tuple[float, ...]  # [C]
    default_dir: str  # '~' is expanded when read
    class_names: tuple[str, ...]


SPECS: dict[str, DatasetSpec] = {
    "fashion_mnist": DatasetSpec(
        name="fashion_mnist",
        tfds_name="fashion_mnist",
        image_shape=(28, 28, 1),
        num_classes=10,
        mean=(0.0,),  # the paper only scales pixels to [0, 1]
        std=(1.0,),
        default_dir="/usr/share/datasets/fashion-mnist",  # Debian: dataset-fashion-mnist
        class_names=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat")
        + ("Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
    ),
    "cifar10": DatasetSpec(
        name="cifar10",
        tfds_name="cifar10",
        image_shape=(32, 32, 3),
        num_classes=10,
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
        default_dir="~/.cache/cifar-10-batches-py",
        class_names=("airplane", "automobile", "bird", "cat", "deer")
        + ("dog", "frog", "horse", "ship", "truck"),
    ),
}
SOURCES = ("auto", "tfds", "files", "synthetic")

_FMNIST_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz")
_FMNIST_FILES += ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
_CIFAR_FILES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",)
_FIX_FILES = {
    "fashion_mnist": "install them with `apt-get install dataset-fashion-mnist` (into "
    "/usr/share/datasets/fashion-mnist) or download them from "
    "https://github.com/zalandoresearch/fashion-mnist into data.dir",
    "cifar10": "download https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz and extract "
    "it, so that data.dir (default ~/.cache/cifar-10-batches-py) holds data_batch_1..5 and "
    "test_batch",
}


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
        raise ValueError(f"unknown dataset {name!r}; expected one of {sorted(SPECS)}")
    if source not in SOURCES:
        raise ValueError(f"unknown data source {source!r}; expected one of {list(SOURCES)}")
    spec, data_dir = SPECS[name], data_dir or None
    if source == "synthetic":
        return synthetic_dataset(spec, *synthetic_sizes, seed=seed)
    if source == "auto":
        if _tfds_ready(spec, data_dir):
            source = "tfds"
        elif all(os.path.exists(p) for p in _raw_paths(spec, data_dir)):
            source = "files"
        else:
            raise DataError(_how_to_provide(spec, data_dir))
    arrays = _load_tfds(spec, data_dir) if source == "tfds" else _load_files(spec, data_dir)
    for x, y in (arrays[:2], arrays[2:]):
        if x.shape[1:] != spec.image_shape or x.dtype != np.uint8 or len(y) != len(x):
            raise DataError(
                f"{source}: got images {x.shape} {x.dtype} and {len(y)} labels, "
                f"expected uint8 [M, *{spec.image_shape}] and M labels: is it {name}?"
            )
    return Dataset(*arrays, spec=spec, source=source)


def _how_to_provide(spec: DatasetSpec, data_dir: str | None) -> str:
    return (
        f"no {spec.name} data found. Provide it in one of these ways:\n"
        f"  1. tfds: `pip install -r requirements-tfds.txt`, then data.source=tfds with network "
        f"(downloads into $TFDS_DATA_DIR or ~/tensorflow_datasets), or point $TFDS_DATA_DIR / "
        f"data.dir at a prepared copy;\n"
        f"  2. files: {_FIX_FILES[spec.name]}; looked in "
        f"{os.path.dirname(_raw_paths(spec, data_dir)[0])};\n"
        f"  3. data.source=synthetic: generated stand-in data with the same shapes."
    )


# --- tensorflow-datasets -------------------------------------------------------------


def _has_tensorflow() -> bool:
    return importlib.util.find_spec("tensorflow") is not None


def _tfds_builder(spec: DatasetSpec, data_dir: str | None):
    import tensorflow_datasets as tfds  # optional: requirements-tfds.txt

    return tfds.builder(spec.tfds_name, data_dir=data_dir)


def _tfds_ready(spec: DatasetSpec, data_dir: str | None) -> bool:
    """Whether a prepared copy exists that can be read without downloading."""
    try:
        builder = _tfds_builder(spec, data_dir)
    except ImportError:
        return False
    if not builder.is_prepared():
        return False
    formats = {f.value for f in builder.info.available_file_formats()}
    return "array_record" in formats or _has_tensorflow()


def _load_tfds(spec: DatasetSpec, data_dir: str | None) -> tuple[np.ndarray, ...]:
    """(x_train, y_train, x_test, y_test) through tensorflow-datasets.

    Copies prepared as array_record are read without TensorFlow; preparing a copy, or
    reading one prepared as tfrecord, needs TensorFlow.
    """
    fix = "`pip install -r requirements-tfds.txt`, or use data.source=files or synthetic"
    try:
        builder = _tfds_builder(spec, data_dir)
    except ImportError as e:
        raise DataError(f"data.source=tfds needs `pip install tensorflow-datasets` ({e})") from e
    if not builder.is_prepared():
        if not _has_tensorflow():
            raise DataError(
                f"{spec.tfds_name} is not prepared in {builder.data_dir}, and preparing it needs "
                f"TensorFlow: {fix}; or place there a copy prepared elsewhere with "
                f"`tfds build {spec.tfds_name} --file_format=array_record`"
            )
        builder.download_and_prepare(file_format="array_record")
        builder = _tfds_builder(spec, data_dir)
    formats = {f.value for f in builder.info.available_file_formats()}
    arrays = []
    for split in ("train", "test"):
        if "array_record" in formats:
            source = builder.as_data_source(split=split)
            examples = [source[i] for i in range(len(source))]
            x = np.stack([ex["image"] for ex in examples])
            y = np.array([ex["label"] for ex in examples])
        elif _has_tensorflow():
            import tensorflow_datasets as tfds

            batch = builder.as_dataset(split=split, batch_size=-1, as_supervised=True)
            x, y = tfds.as_numpy(batch)
        else:
            raise DataError(
                f"{builder.data_dir} holds {sorted(formats)} files, which need "
                f"TensorFlow to read: {fix}"
            )
        arrays += [np.asarray(x, np.uint8), np.asarray(y, np.int32)]
    return tuple(arrays)


# --- raw files -----------------------------------------------------------------------


def _raw_paths(spec: DatasetSpec, data_dir: str | None) -> list[str]:
    root = os.path.expanduser(data_dir or spec.default_dir)
    if spec.name == "fashion_mnist":
        return [os.path.join(root, f) for f in _FMNIST_FILES]
    if os.path.isdir(os.path.join(root, "cifar-10-batches-py")):
        root = os.path.join(root, "cifar-10-batches-py")
    return [os.path.join(root, f) for f in _CIFAR_FILES]


def _load_files(spec: DatasetSpec, data_dir: str | None) -> tuple[np.ndarray, ...]:
    """(x_train, y_train, x_test, y_test) from the dataset's own raw files."""
    paths = _raw_paths(spec, data_dir)
    fix = f"{_FIX_FILES[spec.name]}; or use data.source=synthetic"
    for path in paths:
        if not os.path.isfile(path):
            raise DataError(f"{path} not found: {fix}")
    if spec.name == "fashion_mnist":
        expect = [(2051, (28, 28)), (2049, ())] * 2  # IDX magic numbers: images, labels
        x_tr, y_tr, x_te, y_te = (_read_idx(p, *e, fix) for p, e in zip(paths, expect))
        arrays = [x_tr[..., None], y_tr.astype(np.int32), x_te[..., None], y_te.astype(np.int32)]
    else:
        train = [_read_cifar_batch(path, fix) for path in paths[:5]]
        arrays = [np.concatenate([b[0] for b in train]), np.concatenate([b[1] for b in train])]
        arrays += _read_cifar_batch(paths[5], fix)
    for y in arrays[1::2]:
        if y.min(initial=0) < 0 or y.max(initial=0) >= spec.num_classes:
            raise DataError(f"labels outside [0, {spec.num_classes}) in {paths}: {fix}")
    return tuple(arrays)


def _read_idx(path: str, magic: int, item_shape: tuple[int, ...], fix: str) -> np.ndarray:
    """The array [M, *item_shape] uint8 of a gzipped IDX file."""
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path} is not a complete gzip file ({e}): {fix}") from e
    header = 4 * (2 + len(item_shape))
    words = np.frombuffer(raw[:header].ljust(header, b"\0"), ">u4")
    if words[0] != magic:
        raise DataError(f"{path}: IDX magic number {words[0]}, expected {magic}: {fix}")
    if tuple(words[2:]) != item_shape:
        raise DataError(f"{path}: items of shape {tuple(words[2:])}, expected {item_shape}")
    expected = header + int(words[1]) * int(np.prod(item_shape))
    if len(raw) != expected:
        raise DataError(
            f"{path}: {len(raw):,} bytes after decompression, expected {expected:,} "
            f"(header for {words[1]:,} items): the file is truncated or corrupt; {fix}"
        )
    return np.frombuffer(raw, np.uint8, offset=header).reshape(-1, *item_shape)


def _read_cifar_batch(path: str, fix: str) -> tuple[np.ndarray, np.ndarray]:
    """Images [k, 32, 32, 3] uint8 and labels [k] int32 of one CIFAR-10 python batch."""
    try:
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="bytes")  # the dataset's own format is a pickle
        data = np.asarray(batch[b"data"] if b"data" in batch else batch["data"])
        labels = np.asarray(batch[b"labels"] if b"labels" in batch else batch["labels"])
    except Exception as e:  # unpickling fails in many ways on a damaged file
        raise DataError(f"{path} is not a readable CIFAR-10 python batch ({e!r}): {fix}") from e
    if data.dtype != np.uint8 or data.shape[1:] != (3072,) or labels.shape != data.shape[:1]:
        raise DataError(
            f"{path}: expected uint8 data [k, 3072] and k labels, got data "
            f"{data.shape} {data.dtype} and labels {labels.shape}: {fix}"
        )
    x = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # rows are CHW
    return np.ascontiguousarray(x), labels.astype(np.int32)


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


# --- normalization and partitions ----------------------------------------------------


def normalize(x: jax.Array, spec: DatasetSpec) -> jax.Array:
    """uint8 images [..., H, W, C] -> float32 (x / 255 - mean) / std per channel."""
    shape = (1,) * (x.ndim - 1) + (-1,)
    mean = jnp.asarray(spec.mean, jnp.float32).reshape(shape)
    std = jnp.asarray(spec.std, jnp.float32).reshape(shape)
    return (jnp.asarray(x).astype(jnp.float32) / 255.0 - mean) / std


class ClientData(NamedTuple):
    """Every client's examples, padded to one length."""

    x: np.ndarray  # [N, n, H, W, C] uint8, zero past count
    y: np.ndarray  # [N, n] int32, 0 past count
    count: np.ndarray  # [N] int32 real examples of each client


def partition_iid(
    num_examples: int, num_clients: int, batch_size: int, rng: np.random.Generator
) -> np.ndarray:
    """The paper's IID split: indices [N, n] of equal-size clients.

    Shuffled indices are cut into batches of `batch_size` and dealt round-robin to the
    clients; batches that would make clients unequal are dropped.
    """
    batches = rng.permutation(num_examples)[: num_examples // batch_size * batch_size]
    batches = batches.reshape(-1, batch_size)  # [num_batches, batch_size]
    per_client = len(batches) // num_clients
    if per_client == 0:
        raise ValueError(
            f"{len(batches)} batches of {batch_size} for {num_clients} clients: "
            "some clients would get no data"
        )
    dealt = batches[: per_client * num_clients].reshape(per_client, num_clients, batch_size)
    return dealt.transpose(1, 0, 2).reshape(num_clients, per_client * batch_size)


def partition_dirichlet(
    labels: np.ndarray,
    num_clients: int,
    alpha: float,
    rng: np.random.Generator,
    num_classes: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Non-IID split: each class is divided among clients in Dirichlet(alpha) proportions.

    Returns indices [N, n_max], rows padded by repeating a client's own index, and count [N].
    Every client gets at least one example. Small alpha: few classes per client.
    """
    labels = np.asarray(labels)
    if len(labels) < num_clients:
        raise ValueError(f"{len(labels)} examples cannot give {num_clients} clients one each")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes})")
    parts = [[] for _ in range(num_clients)]
    for c in range(num_classes):
        idx = rng.permutation(np.flatnonzero(labels == c))
        share = rng.dirichlet(np.full(num_clients, alpha))  # [N]
        cuts = np.round(np.cumsum(share)[:-1] * len(idx)).astype(int)
        for part, chunk in zip(parts, np.split(idx, cuts), strict=True):
            part.append(chunk)
    clients = [np.concatenate(p) for p in parts]
    for i in range(num_clients):  # a client left empty takes one example of the largest
        if len(clients[i]) == 0:
            j = int(np.argmax([len(ci) for ci in clients]))
            clients[i], clients[j] = clients[j][-1:], clients[j][:-1]
    clients = [rng.permutation(ci) for ci in clients]
    count = np.array([len(ci) for ci in clients], np.int32)
    indices = np.stack([np.pad(ci, (0, count.max() - len(ci)), mode="edge") for ci in clients])
    return indices, count


def make_client_data(
    x: np.ndarray, y: np.ndarray, indices: np.ndarray, count: np.ndarray | None = None
) -> ClientData:
    """Gathers x [M, H, W, C], y [M] by indices [N, n]; count [N] defaults to n each."""
    indices = np.asarray(indices)
    num_clients, n = indices.shape
    count = np.full(num_clients, n, np.int32) if count is None else np.asarray(count, np.int32)
    real = np.arange(n)[None, :] < count[:, None]  # [N, n]
    cx = np.where(real[..., None, None, None], x[indices], 0).astype(np.uint8)
    cy = np.where(real, y[indices], 0).astype(np.int32)
    return ClientData(cx, cy, count)
