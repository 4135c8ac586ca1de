"""The training set split among clients: a registry of partitions (`data.partition`).

Every partition is a factory `(labels [M], *, num_clients, batch_size, num_classes, rng,
**block) -> (indices [N, n], count [N])`, whose keyword arguments with defaults are its
block `data.<name>.*` (the registry convention: fedjax_poison/registry.py). Built in: the
paper's IID deal, Dirichlet label skew, and McMahan et al.'s shards.
Shapes: [M] dataset size, [N] clients, [n] examples per client (padded by repeating the
client's own indices past count).
"""

from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from fedjax_poison.data.raw_files import DataError
from fedjax_poison.registry import Registry

SIZES = ("labels", "num_clients", "batch_size", "num_classes", "rng")
# Fields of the `data.` block: no partition may take their names for its block.
DATA_FIELDS = ("source", "dir", "partition", "partition_seed", "synthetic_train", "synthetic_test")
PARTITIONS = Registry(
    "partition", "data.partition", "data.{name}", sizes=SIZES, reserved=DATA_FIELDS
)


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
        raise DataError(
            f"num_clients={num_clients}: {num_examples} training examples make "
            f"{len(batches)} batches of batch_size={batch_size}, so some clients would get "
            f"no data; use at most {len(batches)} clients (or a smaller batch_size)"
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
        raise DataError(
            f"num_clients={num_clients}: {len(labels)} training examples cannot give every "
            "client one"
        )
    if labels.min() < 0 or labels.max() >= num_classes:
        raise DataError(f"labels must lie in [0, {num_classes})")
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


def iid(
    *, labels: np.ndarray, num_clients: int, batch_size: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """The paper's IID split (Tolpegin et al. 2020): equal clients, batches dealt round-robin."""
    indices = partition_iid(len(labels), num_clients, batch_size, rng)
    return indices, np.full(num_clients, indices.shape[1], np.int32)


def dirichlet(
    *,
    labels: np.ndarray,
    num_clients: int,
    num_classes: int,
    rng: np.random.Generator,
    alpha: float = 0.5,
) -> tuple[np.ndarray, np.ndarray]:
    """Label skew: each class divided among clients in Dirichlet(alpha) proportions (Hsu et
    al. 2019); small alpha, few classes per client."""
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha!r}")
    return partition_dirichlet(labels, num_clients, alpha, rng, num_classes)


def shards(
    *,
    labels: np.ndarray,
    num_clients: int,
    rng: np.random.Generator,
    per_client: int = 2,
) -> tuple[np.ndarray, np.ndarray]:
    """The pathological non-IID split of McMahan et al. (AISTATS 2017): the examples sorted
    by label, cut into num_clients * per_client equal shards, `per_client` random shards
    to each client (2: most clients hold two classes)."""
    if per_client < 1:
        raise ValueError(f"per_client must be >= 1, got {per_client!r}")
    count = num_clients * per_client
    if len(labels) < count:
        raise DataError(
            f"num_clients={num_clients} x data.shards.per_client={per_client} shards need at "
            f"least {count} training examples, got {len(labels)}"
        )
    order = np.argsort(labels, kind="stable")
    size = len(labels) // count
    cut = order[: size * count].reshape(count, size)  # [shards, size]
    dealt = rng.permutation(count).reshape(num_clients, per_client)
    indices = np.stack([rng.permutation(cut[row].reshape(-1)) for row in dealt])
    return indices, np.full(num_clients, indices.shape[1], np.int32)


def register(name: str, factory: Callable[..., tuple], *, replace: bool = False):
    """Adds a partition (see the module docstring)."""
    return PARTITIONS.register(name, factory, replace=replace)


register("iid", iid)
register("dirichlet", dirichlet)
register("shards", shards)


def split(name: str, block, labels, **sizes) -> tuple[np.ndarray, np.ndarray]:
    """(indices [N, n], count [N]) of partition `name`, checked: every client holds at least
    one example, and every index lies in [0, M)."""
    indices, count = PARTITIONS.build(name, block, labels=labels, **sizes)
    indices, count = np.asarray(indices), np.asarray(count, np.int32)
    n = len(labels)
    if indices.ndim != 2 or count.shape != (indices.shape[0],):
        raise DataError(f"partition {name!r} returned indices {indices.shape}, count {count.shape}")
    if (count < 1).any() or (count > indices.shape[1]).any():
        raise DataError(f"partition {name!r} left a client with no example (or too many)")
    if indices.min() < 0 or indices.max() >= n:
        raise DataError(f"partition {name!r} returned an index outside [0, {n})")
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


def class_counts(y: np.ndarray, count: np.ndarray, num_classes: int) -> np.ndarray:
    """[N, C] int: how many examples of each class every client holds."""
    real = np.arange(y.shape[1])[None, :] < count[:, None]
    return np.stack([np.bincount(row[m], minlength=num_classes) for row, m in zip(y, real)])
