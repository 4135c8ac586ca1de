"""The run's state after an evaluation, and its orbax checkpoints.

A checkpoint holds exactly a `RunState`: where the run stands (group, round, the rows of
metrics.jsonl written, time spent) and the arrays the loop carries (the group's server
states, detection counts, divergence and degenerate rounds). The same command resumes
from it as if the run had never stopped.

Orbax writes a checkpoint into a temporary folder and renames it once complete, so a kill
in mid-write leaves the previous one intact; the last two are kept. A step counts rounds
over the whole sweep (group * num_rounds + round), so steps grow from group to group.
"""

import logging as std_logging
import os
from typing import Any, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp

from fedjax_poison.errors import UserError
from fedjax_poison.round import sharding

FOLDER = "checkpoints"  # in the workdir
META = ("group", "round", "lines", "train_s", "compile_s")


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
    """The orbax checkpoints of one run, in `directory`."""

    def __init__(self, directory: str, num_rounds: int, keep: int = 2):
        self.directory = os.path.abspath(directory)
        self.num_rounds = num_rounds
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
        """Where the last complete checkpoint stands (META: group, round, ...), or None."""
        step = self.manager.latest_step()
        if step is None:
            return None
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
                "(another model or defense?): use another --workdir"
            )
        states = jax.tree.unflatten(treedef, arrays.pop("states"))
        return RunState(**meta, states=states, **arrays)

    def save(self, state: RunState) -> None:
        """Saves synchronously and atomically; the oldest of more than `keep` is deleted."""
        arrays = dict(state.arrays)
        arrays["states"] = [np.asarray(x) for x in jax.tree.leaves(sharding.to_host(state.states))]
        meta = {key: getattr(state, key) for key in META}
        self.manager.save(
            state.group * self.num_rounds + state.round,
            args=ocp.args.Composite(
                arrays=ocp.args.StandardSave(arrays), meta=ocp.args.JsonSave(meta)
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
