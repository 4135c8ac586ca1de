"""`run(config)`: a run from Python (a notebook, a script), set up as the command line does."""

import datetime
import logging
import os
import sys
from typing import NamedTuple

from absl import logging as absl_logging

from fedjax_poison import files
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


def setup_devices(config) -> None:
    """One CPU device per core (config.mesh.cpu_devices), and joining a multi-host run
    (config.distributed.*); both only before JAX has started its backends."""
    try:
        sharding.use_cpu_devices(config.mesh.cpu_devices)
    except RuntimeError as e:  # JAX was used already in this process
        log.info("JAX is already initialised (%s): the run uses its devices as they are", e)
    d = config.distributed
    sharding.initialize_distributed(d.coordinator, d.num_processes, d.process_id)


def run(config, workdir: str | None = None, *, name: str = "run") -> RunResult:
    """Runs a config (an ml_collections.ConfigDict, e.g. configs/fashion_mnist.py's
    get_config()) as `launch.py` does: devices set up, progress logged.

    workdir None: runs/<name>/<date-time>. The same workdir resumes an interrupted run.
    Raises a fedjax_poison.errors.UserError subclass for anything the user can fix.
    """
    quiet_libraries()
    show_progress()
    setup_devices(config)
    workdir = default_workdir(name) if workdir is None else workdir
    summary = train.train_and_evaluate(config, workdir)
    if summary is None:  # not the primary process of a multi-host run
        return RunResult(workdir, {}, [])
    history = files.read_lines(os.path.join(workdir, "metrics.jsonl"))
    return RunResult(os.path.abspath(workdir), summary, history)
