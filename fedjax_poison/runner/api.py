"""The Python API: `run(config)`, a run set up as the command line does, and `register_*`,
which add a user's attacks, defenses, models, datasets and partitions to the registries."""

import datetime
import logging
import os
import sys
from collections.abc import Callable
from typing import NamedTuple

from absl import logging as absl_logging

from fedjax_poison import attacks, data, defenses, files, models
from fedjax_poison.config import configuration
from fedjax_poison.data import custom, partition
from fedjax_poison.round import sharding
from fedjax_poison.runner import train

log = logging.getLogger("fedjax_poison")


class RunResult(NamedTuple):
    workdir: str
    summary: dict  # summary.json
    history: list  # every row of metrics.jsonl: one per experiment and evaluation


def default_workdir(name: str, root: str = "runs") -> str:
    """runs/<name>/<date-time>: a new folder for each launch."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return os.path.join(root, name, stamp)


def quiet_libraries() -> None:
    """JAX's backend probes (e.g. for a TPU) and orbax's step logs at INFO say nothing a user
    needs; warnings stay."""
    for name in ("jax", "jax._src.xla_bridge", "orbax", "absl.orbax"):
        logging.getLogger(name).setLevel(logging.WARNING)


def configure_cli_logging() -> None:
    """For a command line run under absl.app: progress lines as `HH:MM:SS message`, without
    absl's prefix or library noise."""
    absl_logging.set_verbosity(absl_logging.INFO)
    formatter = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
    absl_logging.get_absl_handler().setFormatter(formatter)
    quiet_libraries()


def show_progress() -> None:
    """Sends the run's progress lines to stderr, unless logging is already configured."""
    if not log.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
    if log.getEffectiveLevel() > logging.INFO:
        log.setLevel(logging.INFO)


def setup_devices(config, stop=None) -> None:
    """One CPU device per core (config.mesh.cpu_devices), and joining a multi-host run
    (config.distributed.*); both only before JAX has started its backends. stop: an Event
    that ends the wait for the coordinator."""
    try:
        sharding.use_cpu_devices(config.mesh.cpu_devices)
    except RuntimeError as e:  # JAX was used already in this process
        log.info("JAX is already initialised (%s): the run uses its devices as they are", e)
    configuration.validate_distributed(config)  # before waiting on anyone
    d = config.distributed
    sharding.initialize_distributed(
        d.coordinator, d.num_processes, d.process_id, d.timeout_s, stop=stop
    )


def run(config, workdir: str | None = None, *, name: str = "run", stop=None) -> RunResult:
    """Runs a config (an ml_collections.ConfigDict, e.g. configs/fashion_mnist.py's
    get_config()) as `launch.py` does: devices set up, progress logged.

    workdir None: runs/<name>/<date-time>. The same workdir resumes an interrupted run.
    Raises a fedjax_poison.errors.UserError subclass for anything the user can fix.
    stop: a threading.Event (fedjax_poison.signals.catch()) that, once set, ends the run
    at its next safe point with train.Interrupted.
    """
    quiet_libraries()
    show_progress()
    setup_devices(config, stop)
    workdir = default_workdir(name) if workdir is None else workdir
    summary = train.train_and_evaluate(config, workdir, stop=stop)
    if summary is None:  # not the primary process of a multi-host run
        return RunResult(workdir, {}, [])
    history = files.read_lines(os.path.join(workdir, "metrics.jsonl"))
    return RunResult(os.path.abspath(workdir), summary, history)


def register_attack(name: str, factory: Callable, *, replace: bool = False) -> Callable:
    """Adds an attack to `attack.name` (and `sweep.attack`): `factory(**block, **sizes) ->
    fedjax_poison.attacks.Attack`, whose keyword arguments with defaults become the config
    block `attack.<name>.*`; the sizes it may take: num_classes, image_shape,
    clients_per_round, head_index, num_params. `fedjax_poison.testing.check_attack` checks
    it."""
    return attacks.register(name, factory, replace=replace)


def register_defense(
    name: str,
    factory: Callable,
    *,
    pre_aggregator: bool = False,
    per_client_memory: bool = False,
    replace: bool = False,
) -> Callable:
    """Adds a defense to `defense.name` (and `sweep.defense`): `factory(**block, **sizes) ->
    fedjax_poison.defenses.Defense` (pre_aggregator=True: -> PreAggregator, used before a
    rule with '+'), its keyword arguments with defaults the block `defense.<name>.*`; the
    sizes it may take: num_clients, clients_per_round (the rows it receives), num_params,
    num_classes, head_features, mode, layer_sizes (each parameter array's size in the
    flattened update). `fedjax_poison.testing.check_defense` checks it."""
    return defenses.register(
        name,
        factory,
        pre_aggregator=pre_aggregator,
        per_client_memory=per_client_memory,
        replace=replace,
    )


def register_model(
    name: str,
    factory: Callable,
    *,
    input_shape: tuple[int, int, int] | None = None,
    replace: bool = False,
) -> Callable:
    """Adds a model to `model.name`: a Flax module class (or factory) taking num_classes,
    whose fields with defaults become `model.*` (see fedjax_poison.models for the contract;
    `fedjax_poison.testing.check_model` checks it). input_shape: the only images it takes."""
    return models.register(name, factory, input_shape=input_shape, replace=replace)


def register_dataset(
    name: str,
    *,
    arrays: tuple | None = None,
    load: Callable[[], tuple] | None = None,
    tfds_name: str = "",
    replace: bool = False,
    **spec,
) -> data.DatasetSpec:
    """Adds a dataset to `dataset`, from arrays (x_train, y_train, x_test, y_test: uint8
    images [M, H, W, C] and integer labels), from `load()` returning them, or from
    tensorflow-datasets by `tfds_name`. spec: image_shape and num_classes (needed unless
    `arrays` gives them), mean, std, class_names, recipe (the training setup
    `configuration.paper_config(name)` starts from; see data/custom.py)."""
    if arrays is not None:
        made = custom.from_arrays(name, *arrays, **spec)
    else:
        made = custom.make_spec(name, load=load, tfds_name=tfds_name, **spec)
    return custom.register(made, replace=replace)


def register_partition(name: str, factory: Callable, *, replace: bool = False) -> Callable:
    """Adds a partition to `data.partition`: `factory(*, labels [M], num_clients, batch_size,
    num_classes, rng, **block) -> (indices [N, n], count [N])`, its keyword arguments with
    defaults the block `data.<name>.*`."""
    return partition.register(name, factory, replace=replace)
