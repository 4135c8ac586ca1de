"""Datasets from their own raw files: gzipped IDX (MNIST, Fashion-MNIST), CIFAR python pickles.

Every reader takes the files' paths in the order of the dataset spec's `files`, and `fix`
(what to tell a user whose files are missing or damaged), and returns
(x_train [M, H, W, C] uint8, y_train [M] int32, x_test, y_test).
"""

import gzip
import pickle
import zlib

import numpy as np

from fedjax_poison.errors import UserError


class DataError(UserError, ValueError):
    """The data cannot be provided as asked; the message says how to provide it."""


IDX_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz")
IDX_FILES += ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
CIFAR10_FILES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",)
CIFAR100_FILES = ("train", "test")


def read_idx_dataset(paths: list[str], fix: str) -> tuple[np.ndarray, ...]:
    """MNIST-style gzipped IDX files: train images, train labels, test images, test labels."""
    expect = [(2051, (28, 28)), (2049, ())] * 2  # IDX magic numbers: images, labels
    x_tr, y_tr, x_te, y_te = (read_idx(p, *e, fix) for p, e in zip(paths, expect))
    return x_tr[..., None], y_tr.astype(np.int32), x_te[..., None], y_te.astype(np.int32)


def read_idx(path: str, magic: int, item_shape: tuple[int, ...], fix: str) -> np.ndarray:
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


def read_cifar10(paths: list[str], fix: str) -> tuple[np.ndarray, ...]:
    """CIFAR-10's python batches: data_batch_1..5, then test_batch."""
    train = [read_cifar_batch(path, "labels", "CIFAR-10", fix) for path in paths[:5]]
    x_te, y_te = read_cifar_batch(paths[5], "labels", "CIFAR-10", fix)
    x_tr = np.concatenate([b[0] for b in train])
    return x_tr, np.concatenate([b[1] for b in train]), x_te, y_te


def read_cifar100(paths: list[str], fix: str) -> tuple[np.ndarray, ...]:
    """CIFAR-100's python files `train` and `test`, with the 100 fine labels."""
    return (
        *read_cifar_batch(paths[0], "fine_labels", "CIFAR-100", fix),
        *read_cifar_batch(paths[1], "fine_labels", "CIFAR-100", fix),
    )


def read_cifar_batch(path: str, label_key: str, name: str, fix: str):
    """Images [k, 32, 32, 3] uint8 and labels [k] int32 of one CIFAR python pickle."""
    try:
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="bytes")  # the dataset's own format is a pickle
        key = label_key.encode()
        data = np.asarray(batch[b"data"] if b"data" in batch else batch["data"])
        labels = np.asarray(batch[key] if key in batch else batch[label_key])
    except Exception as e:  # unpickling fails in many ways on a damaged file
        raise DataError(f"{path} is not a readable {name} python batch ({e!r}): {fix}") from e
    if data.dtype != np.uint8 or data.shape[1:] != (3072,) or labels.shape != data.shape[:1]:
        raise DataError(
            f"{path}: expected uint8 data [k, 3072] and k labels, got data "
            f"{data.shape} {data.dtype} and labels {labels.shape}: {fix}"
        )
    x = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # rows are CHW
    return np.ascontiguousarray(x), labels.astype(np.int32)
