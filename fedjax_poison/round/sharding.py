"""Spreading a run over devices and hosts: a Mesh with an `experiments` and a `clients` axis.

The experiment axis [E] of states and scenarios is split over `mesh.experiments`
devices; inside a round, the k selected clients' data and training are split over
`mesh.clients` devices. The client data and the test set are replicated. The results
equal a one-device run within float tolerance.

Several hosts (processes) form one mesh over all their devices once
`initialize_distributed` has run. Each process builds only the shards of a global array
that live on its own devices (`make_array_from_callback`), reads results back with
`to_host`, and only the primary process writes files.
"""

import os
import socket
import time
from collections.abc import Callable

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from fedjax_poison.errors import UserError

EXPERIMENTS, CLIENTS = "experiments", "clients"


class MeshError(UserError, ValueError):
    """The requested mesh does not fit the devices or the run's shapes."""


_DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


def cpu_cores() -> int:
    """The CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def cpu_chunk(values_per_item: int, devices: int) -> int:
    """How many items (clients' steps, test images) a CPU device computes at once: about 4k
    input values for each core of the device, with `devices` devices running at once.

    The convolutions copy their input into patches k*k times its size, which must stay in
    the core's cache. On 2 cores, Fashion-MNIST (784 values an image): one device per core
    trains 1.07-1.18x faster one client of B=4 at a time than 2 or 5, and evaluates 10,000
    images in 0.47-0.51 s 5 at a time against 0.52-0.58 s 20 at a time; one device on both
    cores does best at about twice that (benchmarks/README.md).
    """
    cores = max(1, cpu_cores() // max(1, devices))
    return max(1, 4096 * cores // values_per_item)


def use_cpu_devices(count: int) -> None:
    """Gives the CPU backend `count` jax devices, 0 = one per core; before any device is used.

    Each CPU device runs its own stream of operations on one core. Small operations (a
    client's step at batch 4) do not split well over threads, so a round split over one
    device per core trains 1.4x (k=5) to 1.9x (k=50) faster on 2 cores than on one device
    using both (benchmarks/README.md). A device count in XLA_FLAGS, when given, wins.
    """
    if _DEVICE_COUNT_FLAG not in os.environ.get("XLA_FLAGS", ""):
        jax.config.update("jax_num_cpu_devices", count or cpu_cores())


def auto_clients(experiments: int, clients_per_round: int) -> int:
    """mesh.clients=0: the devices left by the experiments axis, at most k.

    On CPU only one device per core counts: more would share cores.
    """
    usable = jax.device_count()
    if jax.default_backend() == "cpu":
        usable = min(jax.local_device_count(), cpu_cores()) * jax.process_count()
    return max(1, min(clients_per_round, usable // experiments))


def make_mesh(experiments: int, clients: int) -> Mesh | None:
    """A [experiments, clients] device mesh, or None for a one-device run."""
    need = experiments * clients
    if need == 1:
        return None
    devices = jax.devices()
    if len(devices) < need:
        raise MeshError(
            f"mesh.experiments x mesh.clients = {experiments} x {clients} needs {need} devices, "
            f"{len(devices)} available ({jax.default_backend()}); on CPU, launch.py with "
            f"mesh.cpu_devices={need} makes them"
        )
    # Auto axes: XLA propagates the placement of inputs and the client constraint.
    return jax.make_mesh(
        (experiments, clients),
        (EXPERIMENTS, CLIENTS),
        axis_types=(AxisType.Auto, AxisType.Auto),
        devices=devices[:need],
    )


def check_shapes(mesh: Mesh | None, group_size: int, clients_per_round: int) -> None:
    """The experiments must divide evenly over their devices; the clients are padded."""
    if mesh is None:
        return
    if group_size % mesh.shape[EXPERIMENTS]:
        raise MeshError(
            f"mesh.experiments={mesh.shape[EXPERIMENTS]} must divide the experiments run at "
            f"once ({group_size}; see sweep.max_parallel)"
        )
    if mesh.shape[CLIENTS] > clients_per_round:
        raise MeshError(
            f"mesh.clients={mesh.shape[CLIENTS]} must be at most clients_per_round "
            f"({clients_per_round})"
        )


def by_experiment(mesh: Mesh | None, tree):
    """Places a pytree with a leading [E] axis split over the experiments axis."""
    return _place(mesh, tree, PartitionSpec(EXPERIMENTS))


def replicated(mesh: Mesh | None, tree):
    """Places a pytree whole on every device of the mesh."""
    return _place(mesh, tree, PartitionSpec())


def _place(mesh: Mesh | None, tree, spec: PartitionSpec):
    """tree's leaves (host or local device arrays, equal on every process) as global arrays.

    Each process copies only the slices its own devices hold.
    """
    if mesh is None:
        return jax.device_put(tree)
    sharding = NamedSharding(mesh, spec)

    def place(leaf):
        host = np.asarray(leaf)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(place, tree)


def to_host(tree):
    """tree's arrays as numpy, whole on every process (gathered from the other hosts)."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))


def is_primary() -> bool:
    """Whether this process writes the run's files (process 0 of a multi-host run)."""
    return jax.process_index() == 0


def agree(flag: bool) -> bool:
    """The primary process's flag, on every process (a decision all must take alike)."""
    if jax.process_count() == 1:
        return flag
    return bool(multihost_utils.broadcast_one_to_all(np.bool_(flag)))


def barrier(name: str) -> None:
    """Waits until every process of a multi-host run got here."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def leave_distributed() -> None:
    """Leaves a multi-host run, every process together after the run's last barrier.

    Left to the interpreter's exit, jax shuts the distributed system down after tearing
    down its backends, and processes that arrive there far apart (a loaded machine) can
    end in an abort in the shutdown barrier."""
    if jax.distributed.is_initialized():
        jax.distributed.shutdown()


def client_groups(mesh: Mesh | None) -> int:
    """How many devices share the clients of a round (and the test set)."""
    return 1 if mesh is None else mesh.shape[CLIENTS]


def experiment_shards(mesh: Mesh | None) -> int:
    """How many devices share the experiments of a group."""
    return 1 if mesh is None else mesh.shape[EXPERIMENTS]


def local_devices(mesh: Mesh | None) -> int:
    """How many of this process's devices the run uses."""
    return 1 if mesh is None else len(mesh.local_devices)


def client_constraint(mesh: Mesh | None) -> Callable:
    """Returns f(tree) that splits arrays with a leading [groups] axis over the clients axis."""
    if mesh is None or mesh.shape[CLIENTS] == 1:
        return lambda tree: tree
    sharding = NamedSharding(mesh, PartitionSpec(CLIENTS))
    return lambda tree: jax.lax.with_sharding_constraint(tree, sharding)


def replicated_constraint(mesh: Mesh | None) -> Callable:
    """Returns f(tree) that puts arrays whole on every device of the clients axis."""
    if mesh is None or mesh.shape[CLIENTS] == 1:
        return lambda tree: tree
    sharding = NamedSharding(mesh, PartitionSpec())
    return lambda tree: jax.lax.with_sharding_constraint(tree, sharding)


def spmd_axis(mesh: Mesh | None) -> str | None:
    """The mesh axis the experiment vmap maps onto (so client constraints keep it split)."""
    return None if mesh is None else EXPERIMENTS


class CoordinatorError(UserError):
    """The coordinator of a multi-host run cannot be reached; the message names it."""


def initialize_distributed(
    coordinator: str, num_processes: int, process_id: int, timeout_s: int = 300, stop=None
) -> None:
    """Joins a multi-host run (config `distributed.*`); must run before any device is used.

    coordinator "host:port" with num_processes and process_id: that cluster. "auto": jax
    detects the cluster (TPU pods, SLURM, Open MPI). "": one host, unless jax's own
    environment variables (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID) say
    otherwise. timeout_s: how long to wait for the coordinator and the other processes.
    stop: a threading.Event; once set, the wait for the coordinator ends and nothing joins.

    A process other than 0 first connects to the coordinator itself, for up to timeout_s:
    jax, when it cannot, ends the process with a C++ abort instead of an error.
    """
    if jax.distributed.is_initialized():
        return
    if coordinator == "auto":
        jax.distributed.initialize(initialization_timeout=timeout_s)
        return
    coordinator = coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS", "")
    if not coordinator:
        return
    joining = process_id if num_processes > 1 else int(os.environ.get("JAX_PROCESS_ID") or 0)
    if joining > 0:
        wait_for_coordinator(coordinator, timeout_s, stop)
    if stop is not None and stop.is_set():
        return
    jax.distributed.initialize(
        coordinator_address=coordinator,
        num_processes=num_processes if num_processes > 1 else None,
        process_id=process_id if num_processes > 1 else None,
        initialization_timeout=timeout_s,
    )


def wait_for_coordinator(coordinator: str, timeout_s: float, stop=None) -> None:
    """Returns once "host:port" accepts a connection, or `stop` is set; CoordinatorError
    after timeout_s."""
    host, _, port = coordinator.rpartition(":")
    end = time.monotonic() + timeout_s
    while True:
        left = end - time.monotonic()
        try:
            with socket.create_connection((host.strip("[]"), int(port)), max(left, 0.1)):
                return
        except (OSError, ValueError) as e:
            reason = e
        if time.monotonic() + 0.5 >= end:
            break
        if stop is not None and stop.is_set():
            return
        time.sleep(0.5)  # process 0 may not have started its coordinator yet
    raise CoordinatorError(
        f"cannot reach the coordinator {coordinator} within {timeout_s:g} s ({reason}): start "
        "process 0 first, check distributed.coordinator (host:port of process 0) and its "
        "firewall, or raise distributed.timeout_s"
    )
