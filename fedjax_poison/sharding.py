"""Spreading a run over devices and hosts: a Mesh with an `experiments` and a `clients` axis.

The experiment axis [E] of states and scenarios is split over `mesh.experiments`
devices; inside a round, the k selected clients' data and training are split over
`mesh.clients` devices. The client data and the test set are replicated. The results
equal a one-device run within float tolerance.
"""

import os
from collections.abc import Callable

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

EXPERIMENTS, CLIENTS = "experiments", "clients"


class MeshError(ValueError):
    """The requested mesh does not fit the devices or the run's shapes."""


def make_mesh(experiments: int, clients: int) -> Mesh | None:
    """A [experiments, clients] device mesh, or None for a one-device run."""
    need = experiments * clients
    if need == 1:
        return None
    devices = jax.devices()
    if len(devices) < need:
        raise MeshError(
            f"mesh.experiments x mesh.clients = {experiments} x {clients} needs {need} devices, "
            f"{len(devices)} available ({jax.default_backend()}); on CPU, set "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={need}"
        )
    # Auto axes: XLA propagates the placement of inputs and the client constraint.
    return jax.make_mesh(
        (experiments, clients),
        (EXPERIMENTS, CLIENTS),
        axis_types=(AxisType.Auto, AxisType.Auto),
        devices=devices[:need],
    )


def check_shapes(mesh: Mesh | None, group_size: int, clients_per_round: int) -> None:
    """Both sharded axes must divide evenly over their devices."""
    if mesh is None:
        return
    if group_size % mesh.shape[EXPERIMENTS]:
        raise MeshError(
            f"mesh.experiments={mesh.shape[EXPERIMENTS]} must divide the experiments run at "
            f"once ({group_size}; see sweep.max_parallel)"
        )
    if clients_per_round % mesh.shape[CLIENTS]:
        raise MeshError(
            f"mesh.clients={mesh.shape[CLIENTS]} must divide clients_per_round "
            f"({clients_per_round})"
        )


def by_experiment(mesh: Mesh | None, tree):
    """Places a pytree with a leading [E] axis split over the experiments axis."""
    if mesh is None:
        return jax.device_put(tree)
    return jax.device_put(tree, NamedSharding(mesh, PartitionSpec(EXPERIMENTS)))


def replicated(mesh: Mesh | None, tree):
    """Places a pytree whole on every device of the mesh."""
    if mesh is None:
        return jax.device_put(tree)
    return jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))


def client_constraint(mesh: Mesh | None) -> Callable:
    """Returns f(tree) that splits arrays with a leading [k] axis over the clients axis."""
    if mesh is None or mesh.shape[CLIENTS] == 1:
        return lambda tree: tree
    sharding = NamedSharding(mesh, PartitionSpec(CLIENTS))
    return lambda tree: jax.lax.with_sharding_constraint(tree, sharding)


def spmd_axis(mesh: Mesh | None) -> str | None:
    """The mesh axis the experiment vmap maps onto (so client constraints keep it split)."""
    return None if mesh is None else EXPERIMENTS


def initialize_distributed(coordinator: str, num_processes: int, process_id: int) -> None:
    """Joins a multi-host run; arguments from the config or, when empty, the environment.

    The environment variables are jax's own (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES,
    JAX_PROCESS_ID); on TPU pods and SLURM, jax finds everything itself.
    """
    coordinator = coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS", "")
    if not coordinator and num_processes <= 1 and "SLURM_JOB_ID" not in os.environ:
        return
    jax.distributed.initialize(
        coordinator_address=coordinator or None,
        num_processes=num_processes if num_processes > 1 else None,
        process_id=process_id if num_processes > 1 else None,
    )
