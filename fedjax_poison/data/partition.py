"""The training set split among clients: a registry of partitions (`data.partition`).

Every partition is a factory `(labels [M], *, num_clients, batch_size, num_classes, rng,
**block) -> (indices, count [N])`, whose keyword arguments with defaults are its block
`data.<name>.*` (the registry convention: fedjax_poison/registry.py). `indices` is either
ragged, [sum(count)] with client i's examples after those of clients < i, or padded,
[N, n] of which row i's first count[i] are client i's. Built in: the paper's IID deal,
Dirichlet label skew, and McMahan et al.'s shards.
Shapes: [M] dataset size, [N] clients, [n] examples of the largest client.
"""

import heapq
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
    """Every client's examples, stored once: client i holds x[start[i] : start[i] + count[i]]."""

    x: np.ndarray  # [M, H, W, C] uint8, the clients' examples one after the other
    y: np.ndarray  # [M] int32
    start: np.ndarray  # [N] int32
    count: np.ndarray  # [N] int32


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

    Returns ragged indices [M] (client after client) and count [N]. Every client gets at
    least one example. Small alpha: few classes per client.
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
    _fill_empty(clients)
    clients = [rng.permutation(ci) for ci in clients]
    count = np.array([len(ci) for ci in clients], np.int32)
    return np.concatenate(clients), count


def _fill_empty(clients: list[np.ndarray]) -> None:
    """Gives each empty client one example of the currently largest client, in place."""
    empty = [i for i, ci in enumerate(clients) if len(ci) == 0]
    if not empty:
        return
    heap = [(-len(ci), i) for i, ci in enumerate(clients) if len(ci) > 1]
    heapq.heapify(heap)
    for i in empty:
        size, j = heapq.heappop(heap)
        clients[i], clients[j] = clients[j][-1:], clients[j][:-1]
        if -size - 1 > 1:
            heapq.heappush(heap, (size + 1, j))


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
    """(indices [sum(count)], count [N]) of partition `name`, ragged, checked: every client
    holds at least one example, and every index lies in [0, M)."""
    indices, count = PARTITIONS.build(name, block, labels=labels, **sizes)
    indices, count = np.asarray(indices), np.asarray(count)
    n = len(labels)
    if count.ndim != 1 or not np.issubdtype(count.dtype, np.integer):
        raise DataError(f"partition {name!r} returned count of shape {count.shape}, {count.dtype}")
    if (count < 1).any():
        raise DataError(f"partition {name!r} left a client with no example")
    if indices.ndim == 2:
        if indices.shape[0] != len(count) or (count > indices.shape[1]).any():
            raise DataError(
                f"partition {name!r} returned indices {indices.shape} for count {count.shape}"
            )
        indices = indices[np.arange(indices.shape[1])[None, :] < count[:, None]]
    elif indices.ndim != 1 or len(indices) != count.sum():
        raise DataError(
            f"partition {name!r} returned indices {indices.shape}: ragged indices hold "
            f"sum(count) = {count.sum()} entries"
        )
    if not np.issubdtype(indices.dtype, np.integer):
        raise DataError(f"partition {name!r} returned indices of dtype {indices.dtype}")
    if len(indices) and (indices.min() < 0 or indices.max() >= n):
        raise DataError(f"partition {name!r} returned an index outside [0, {n})")
    return indices, count.astype(np.int32)


def make_client_data(
    x: np.ndarray, y: np.ndarray, indices: np.ndarray, count: np.ndarray | None = None
) -> ClientData:
    """Client data from x [M, H, W, C], y [M] and ragged indices [sum(count)] with count [N]
    (or indices [N, n] without count: every client holds its row)."""
    indices = np.asarray(indices)
    if count is None:
        count = np.full(indices.shape[0], indices.shape[1], np.int32)
        indices = indices.reshape(-1)
    count = np.asarray(count, np.int32)
    start = np.concatenate([[0], np.cumsum(count)[:-1]]).astype(np.int32)
    return ClientData(x[indices].astype(np.uint8), y[indices].astype(np.int32), start, count)


def class_counts(data: ClientData, num_classes: int) -> np.ndarray:
    """[N, C] int: how many examples of each class every client holds."""
    owner = np.repeat(np.arange(len(data.count)), data.count)  # [M]
    flat = np.bincount(owner * num_classes + data.y, minlength=len(data.count) * num_classes)
    return flat.reshape(len(data.count), num_classes)
