"""A run's workdir as a record that survives pre-emption: the workdir guard and checkpoints.

A checkpoint is taken after an evaluation, so that the state and the metrics written so
far agree. It holds what the run loop needs to go on as if it had never stopped:

    arrays   states     the group's stacked ServerState [G], as its list of leaves
             detected   [G, 4] int64, cumulative (tp, fp, fn, tn) of the defense's flags
             diverged   [G] int32, the round each experiment first went non-finite (0 = never)
    meta     Progress   the group of the sweep, the rounds it has done, the metrics.jsonl rows
                        written up to there, and the time spent so far

Orbax writes a checkpoint into a temporary folder and renames it once complete, so a kill
in mid-write leaves the previous one intact; the last two are kept. A step counts rounds
over the whole sweep (group * num_rounds + round), so steps grow from group to group.
"""

import importlib.metadata
import json
import logging as std_logging
import os
import platform
import shutil
from typing import Any, NamedTuple

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from fedjax_poison import report, sharding
from fedjax_poison.configuration import ConfigError

CHECKPOINTS = "checkpoints"  # folder in the workdir
RUN_FILES = ("config.json", "environment.json", "malicious.json", "metrics.jsonl")
RUN_FILES += ("summary.json", "curves.png")
# Fields that may change between the launches of one run: they do not change its results.
RESUMABLE_FIELDS = ("overwrite", "checkpoint_every")
PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy")


def _quiet_orbax(record: std_logging.LogRecord) -> bool:
    """Orbax logs every step of every save at INFO; a run's log keeps its warnings only."""
    return record.levelno >= std_logging.WARNING or f"{os.sep}orbax{os.sep}" not in record.pathname


std_logging.getLogger("absl").addFilter(_quiet_orbax)


class CheckpointError(RuntimeError):
    """A checkpoint or the metrics beside it cannot be used to resume; the message says why."""


class Progress(NamedTuple):
    """Where a run stands at a checkpoint (JSON in the checkpoint)."""

    group: int  # index into train.experiment_groups
    round: int  # rounds done by that group
    lines: int  # rows of metrics.jsonl written up to here
    train_s: float  # training and evaluation time so far, over every launch
    compile_s: float  # compile time of the launch that saved it


class Carry(NamedTuple):
    """The arrays a group's run loop carries from one chunk to the next (host or device)."""

    states: Any  # ServerState [G]
    detected: np.ndarray  # [G, 4] int64
    diverged: np.ndarray  # [G] int32, round of the first non-finite value, 0 = none
    degenerate: np.ndarray  # [G] int32, rounds in which the rule kept nobody or one client


def claim_workdir(c: ml_collections.ConfigDict, workdir: str, clear: bool = True) -> None:
    """Refuses a workdir that holds a run of another config, unless c.overwrite replaces it.

    A workdir of the same config (up to RESUMABLE_FIELDS) is kept, to be resumed. With
    clear=False (the other processes of a multi-host run) nothing is deleted.
    """
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        if clear:
            _clear(workdir)  # stray files of an unknown run are never resumed
        return
    try:
        with open(path) as f:
            old = json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path} cannot be read ({e}): use another --workdir") from None
    new = json.loads(report.dumps(c.to_dict()))
    for key in RESUMABLE_FIELDS:
        old.pop(key, None)
        new.pop(key, None)
    difference = _first_difference(old, new)
    if difference is None:
        return
    field, was, now = difference
    if not c.overwrite:
        raise ConfigError(
            f"workdir {workdir} holds a run of another config ({field} is {was!r} there, "
            f"{now!r} now): use another --workdir, or --config.overwrite=True to replace it"
        )
    if clear:
        logging.warning("overwrite: replacing the run in %s (%s was %r)", workdir, field, was)
        _clear(workdir)


def _first_difference(old, new, prefix: str = ""):
    """(field, old value, new value) of the first field that differs, or None."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            found = _first_difference(old.get(key), new.get(key), f"{prefix}{key}.")
            if found is not None:
                return found
        return None
    return None if old == new else (prefix.rstrip("."), old, new)


def _clear(workdir: str) -> None:
    for name in RUN_FILES:
        path = os.path.join(workdir, name)
        if os.path.exists(path):
            os.remove(path)
    shutil.rmtree(os.path.join(workdir, CHECKPOINTS), ignore_errors=True)


def environment() -> dict:
    """Versions and device: same config, seed and environment give bitwise equal metrics."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "python": platform.python_version(),
        **versions,
        "backend": jax.default_backend(),
        "device_kind": jax.devices()[0].device_kind,
        "device_count": jax.device_count(),
    }


def write_environment(workdir: str, resumed: bool) -> None:
    """environment.json: the environment the run started in, and any other it resumed in."""
    path = os.path.join(workdir, "environment.json")
    now = environment()
    if not (resumed and os.path.exists(path)):
        report.write_json(path, now)
        return
    with open(path) as f:
        record = json.load(f)
    seen = [{k: v for k, v in record.items() if k != "resumed_in"}] + record.get("resumed_in", [])
    if now not in seen:
        logging.warning(
            "resuming in another environment than %s: metrics may differ from an "
            "uninterrupted run in the last digits",
            seen[-1],
        )
        record["resumed_in"] = record.get("resumed_in", []) + [now]
        report.write_json(path, record)


def restart_metrics(path: str, progress: Progress | None, group_size: int) -> None:
    """Cuts metrics.jsonl back to the rows of the checkpoint (all of them if none).

    Rows written after the checkpoint are computed again on resume, so every row is in the
    file exactly once. A row belongs to group `experiment // group_size`.
    """
    if progress is None:
        report.write_text(path, "")
        return
    at = (progress.group, progress.round)
    report.truncate_lines(path, lambda r: (r.get("experiment", 0) // group_size, r["round"]) <= at)
    kept = len(report.read_lines(path))
    if kept != progress.lines:
        raise CheckpointError(
            f"{path} was changed: the run wrote {progress.lines} rows up to round "
            f"{progress.round} of experiment group {progress.group}, the file holds {kept}; "
            f"delete {os.path.dirname(path)} (or use another --workdir) to start again"
        )


class Checkpoints:
    """The orbax checkpoints of one run, in workdir/checkpoints."""

    def __init__(self, workdir: str, keep: int = 2):
        self.directory = os.path.abspath(os.path.join(workdir, CHECKPOINTS))
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            enable_async_checkpointing=False,  # the next chunk donates the state's buffers
            cleanup_tmp_directories=True,  # what a kill in mid-write left behind
            create=True,
        )
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("arrays", "meta")
        )

    def latest(self) -> Progress | None:
        """The progress of the last complete checkpoint, or None if there is none."""
        step = self.manager.latest_step()
        if step is None:
            return None
        meta = self._restore(step, meta=ocp.args.JsonRestore())["meta"]
        if not isinstance(meta, dict) or set(meta) != set(Progress._fields):
            raise CheckpointError(
                f"checkpoint {step} in {self.directory} was written by another version "
                f"(progress {meta}): delete {self.directory} to start again"
            )
        return Progress(**meta)

    def restore(self, progress: Progress, like: Any, num_rounds: int) -> Carry:
        """The arrays saved with `progress`; `like` is a ServerState [G] of the same shapes."""
        leaves, treedef = jax.tree.flatten(like)
        g = leaves[0].shape[0]
        target = Carry(
            [np.zeros(x.shape, x.dtype) for x in leaves],
            np.zeros((g, 4), np.int64),
            np.zeros(g, np.int32),
            np.zeros(g, np.int32),
        )
        step = progress.group * num_rounds + progress.round
        restored = self._restore(step, arrays=ocp.args.StandardRestore(target._asdict()))
        arrays = restored["arrays"]
        got = jax.tree.leaves(arrays)
        want = jax.tree.leaves(target._asdict())
        if len(got) != len(want) or any(
            a.shape != b.shape or a.dtype != b.dtype for a, b in zip(got, want)
        ):
            raise CheckpointError(
                f"checkpoint {step} in {self.directory} does not fit this config's state "
                f"(another model or defense?): delete {self.directory} to start again"
            )
        states = jax.tree.unflatten(treedef, arrays["states"])
        return Carry(states, arrays["detected"], arrays["diverged"], arrays["degenerate"])

    def save(self, progress: Progress, carry: Carry, num_rounds: int) -> None:
        """Saves synchronously and atomically; the oldest of more than `keep` is deleted."""
        states = [np.asarray(x) for x in jax.tree.leaves(sharding.to_host(carry.states))]
        arrays = Carry(
            states,
            np.asarray(carry.detected),
            np.asarray(carry.diverged),
            np.asarray(carry.degenerate),
        )
        self.manager.save(
            progress.group * num_rounds + progress.round,
            args=ocp.args.Composite(
                arrays=ocp.args.StandardSave(arrays._asdict()),
                meta=ocp.args.JsonSave(progress._asdict()),
            ),
            force=True,
        )

    def close(self) -> None:
        self.manager.close()

    def _restore(self, step: int, **items):
        try:
            return self.manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # orbax and tensorstore raise many types for a bad folder
            raise CheckpointError(
                f"checkpoint {step} in {self.directory} cannot be read ({type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else ''}): delete it to resume from the "
                "one before"
            ) from None
