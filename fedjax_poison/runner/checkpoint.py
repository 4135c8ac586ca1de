"""The run's state after an evaluation, and its orbax checkpoints.

A checkpoint holds exactly a `RunState`: where the run stands (group, round, the rows of
metrics.jsonl written, time spent) and the arrays the loop carries (the group's server
states, detection counts, divergence and degenerate rounds). The same command resumes
from it as if the run had never stopped.

Orbax writes a checkpoint into a temporary folder and renames it once complete, so a kill
in mid-write leaves the previous one intact; the last two are kept. A step counts rounds
over the whole sweep (group * num_rounds + round), so steps grow from group to group.

Each checkpoint folder also holds DIGESTS, the sha256 of every file in it, written once the
checkpoint is complete. A resume checks them before reading anything: a checkpoint with a
changed, missing or unlisted-as-written file is damaged, and the run goes on from the newest
intact one before it (the damaged ones are deleted, with one warning line each), or is
refused in one line when none is left. A flipped byte in an array file would otherwise
resume with wrong parameters and no error.
"""

import hashlib
import json
import logging as std_logging
import os
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp

from fedjax_poison import files
from fedjax_poison.errors import UserError
from fedjax_poison.round import sharding

FOLDER = "checkpoints"  # in the workdir
META = ("group", "round", "lines", "train_s", "compile_s")
DIGESTS = "sha256.json"  # in each checkpoint's folder: {"files": {relative path: sha256}}
log = std_logging.getLogger(__name__)


def _quiet_orbax(record: std_logging.LogRecord) -> bool:
    """Orbax logs every step of every save at INFO; a run's log keeps its warnings only."""
    return record.levelno >= std_logging.WARNING or f"{os.sep}orbax{os.sep}" not in record.pathname


std_logging.getLogger("absl").addFilter(_quiet_orbax)


class CheckpointError(UserError, RuntimeError):
    """A checkpoint or the metrics beside it cannot be used to resume; the message says why."""


class RunState(NamedTuple):
    """Where a run stands after an evaluation: exactly what a checkpoint holds."""

    group: int  # index into plan.groups
    round: int  # rounds the group has done
    lines: int  # rows of metrics.jsonl written up to here
    train_s: float  # training and evaluation time so far, over every launch
    compile_s: float  # compile time of the launch that got here
    states: Any  # ServerState [G] of the group
    detected: np.ndarray  # [G, 4] int64, cumulative (tp, fp, fn, tn) of the defense's flags
    diverged: np.ndarray  # [G] int32, the round an experiment first went non-finite, 0 = never
    degenerate: np.ndarray  # [G] int32, rounds in which the rule kept nobody or one client

    @property
    def arrays(self) -> dict:
        return {
            "states": self.states,
            "detected": self.detected,
            "diverged": self.diverged,
            "degenerate": self.degenerate,
        }


def start(group: int, states, train_s: float, lines: int, compile_s: float) -> RunState:
    """The state of a group before its first round."""
    g = jax.tree.leaves(states)[0].shape[0]
    zeros = lambda *shape, dtype=np.int32: np.zeros(shape, dtype)
    detected = zeros(g, 4, dtype=np.int64)
    return RunState(group, 0, lines, train_s, compile_s, states, detected, zeros(g), zeros(g))


class Checkpoints:
    """The orbax checkpoints of one run, in `directory`.

    `on_write`, if given, is called with the name of each checkpoint's folder (relative to
    `directory`) before it is written: a workdir lists it as the run's (Workdir.own).
    """

    def __init__(
        self,
        directory: str,
        num_rounds: int,
        keep: int = 2,
        on_write: Callable[[str], None] | None = None,
    ):
        self.directory = os.path.abspath(directory)
        self.num_rounds = num_rounds
        self.on_write = on_write
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            enable_async_checkpointing=False,  # the next chunk donates the state's buffers
            cleanup_tmp_directories=True,  # what a kill in mid-write left behind
            create=True,
        )
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("arrays", "meta")
        )

    def latest(self) -> dict | None:
        """Where the last intact checkpoint stands (META: group, round, ...), or None.

        Newer checkpoints whose files do not match their digests are deleted, each with a
        warning naming the file; CheckpointError when no intact one is left.
        """
        damaged = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            problem = self._verify(step)
            if problem is None:
                meta = self._meta(step)
                for bad, why in damaged:
                    log.warning(
                        "checkpoint %d in %s is damaged (%s): resuming from checkpoint %d, "
                        "and checkpoint %d is deleted",
                        bad, self.directory, why, step, bad,
                    )  # fmt: skip
                    self.manager.delete(bad)
                return meta
            damaged.append((step, problem))
        if damaged:
            step, problem = damaged[0]
            raise CheckpointError(
                f"checkpoint {step} in {self.directory} is damaged ({problem}) and no intact "
                "checkpoint is left to resume from: use --config.overwrite=True to start "
                "again, or another --workdir"
            )
        return None

    def _meta(self, step: int) -> dict:
        meta = self._restore(step, meta=ocp.args.JsonRestore())["meta"]
        if not isinstance(meta, dict) or set(meta) != set(META):
            raise CheckpointError(
                f"checkpoint {step} in {self.directory} was written by another version "
                f"({meta}): use another --workdir, or --config.overwrite=True to start again"
            )
        return meta

    def restore(self, meta: dict, like: Any) -> RunState:
        """The state saved with `meta`; `like` is a ServerState [G] of the same shapes."""
        leaves, treedef = jax.tree.flatten(like)
        g = leaves[0].shape[0]
        target = {
            "states": [np.zeros(x.shape, x.dtype) for x in leaves],
            "detected": np.zeros((g, 4), np.int64),
            "diverged": np.zeros(g, np.int32),
            "degenerate": np.zeros(g, np.int32),
        }
        step = meta["group"] * self.num_rounds + meta["round"]
        arrays = self._restore(step, arrays=ocp.args.StandardRestore(target))["arrays"]
        got, want = jax.tree.leaves(arrays), jax.tree.leaves(target)
        if len(got) != len(want) or any(
            a.shape != b.shape or a.dtype != b.dtype for a, b in zip(got, want)
        ):
            raise CheckpointError(
                f"checkpoint {step} in {self.directory} does not fit this config's state "
                "(another model or defense, or experiment groups of another version of "
                "fedjax_poison?): use another --workdir"
            )
        states = jax.tree.unflatten(treedef, arrays.pop("states"))
        return RunState(**meta, states=states, **arrays)

    def save(self, state: RunState) -> None:
        """Saves synchronously and atomically; the oldest of more than `keep` is deleted."""
        arrays = dict(state.arrays)
        arrays["states"] = [np.asarray(x) for x in jax.tree.leaves(sharding.to_host(state.states))]
        meta = {key: getattr(state, key) for key in META}
        step = state.group * self.num_rounds + state.round
        if self.on_write is not None:
            self.on_write(str(step))
        self.manager.save(
            step,
            args=ocp.args.Composite(
                arrays=ocp.args.StandardSave(arrays), meta=ocp.args.JsonSave(meta)
            ),
            force=True,
        )
        if sharding.is_primary():  # one process writes; the others read the same folder
            self._write_digests(step)

    def _write_digests(self, step: int) -> None:
        """Writes DIGESTS into the folder of checkpoint `step`: every file in it."""
        folder = os.path.join(self.directory, str(step))
        digests = {name: _sha256(os.path.join(folder, name)) for name in _walk(folder)}
        data = json.dumps({"files": digests}, indent=1, sort_keys=True) + "\n"
        files.write_atomic(os.path.join(folder, DIGESTS), data.encode())

    def _verify(self, step: int) -> str | None:
        """None if every file of checkpoint `step` matches its digest, else what does not."""
        folder = os.path.join(self.directory, str(step))
        path = os.path.join(folder, DIGESTS)
        try:
            with open(path, "rb") as f:
                listed = json.loads(f.read().decode("utf-8"))["files"]
            listed = {str(name): str(value) for name, value in listed.items()}
        except FileNotFoundError:
            return (
                f"{DIGESTS} is missing: the run was stopped as it saved, or an older "
                "version wrote it"
            )
        except OSError as e:
            raise files.error(path, e, "read") from None
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
            return f"{DIGESTS} is not a list of digests"
        for name, want in sorted(listed.items()):
            inside = os.path.normpath(name)
            if os.path.isabs(inside) or inside.split(os.sep)[0] in ("..", ""):
                return f"{DIGESTS} names {files.short(name)}, outside the checkpoint"
            try:
                got = _sha256(os.path.join(folder, inside))
            except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
                return f"{step}/{files.show(name)} is missing"
            except OSError as e:
                raise files.error(os.path.join(folder, inside), e, "read") from None
            if got != want:
                return f"{step}/{files.show(name)} changed since it was written (sha256)"
        return None

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


def _walk(folder: str) -> list[str]:
    """Every file under `folder`, relative with '/', DIGESTS left out."""
    found = []
    for root, dirs, names in os.walk(folder):
        dirs.sort()
        rel = os.path.relpath(root, folder)
        prefix = "" if rel == "." else rel.replace(os.sep, "/") + "/"
        found += [prefix + n for n in sorted(names) if prefix + n != DIGESTS]
    return found


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
