"""A config's sweep axes expanded into experiments, and each experiment into a Scenario.

A run is a list of experiments (one when nothing is swept); their scenarios stack on
a leading experiment axis [E] and advance together in one compiled program.
"""

import itertools
from typing import NamedTuple

import jax
import ml_collections
import numpy as np

from fedjax_poison import attacks, selection
from fedjax_poison.configuration import SWEEP_AXES, ConfigError
from fedjax_poison.simulation import Scenario


class Experiment(NamedTuple):
    """One experiment's settings; `axes` holds the swept ones (for tables and labels)."""

    axes: dict
    malicious_fraction: float
    flips: attacks.Flips
    seed: int
    schedule: str
    alpha: tuple[float, float]  # before / from the breakpoint
    breakpoint: int


def expand(c: ml_collections.ConfigDict) -> list[Experiment]:
    """The experiments of a config: the product (or zip) of its non-empty sweep axes."""
    swept = {axis: tuple(c.sweep[axis]) for axis in SWEEP_AXES if len(c.sweep[axis])}
    if c.sweep.mode == "zip":
        combos = [dict(zip(swept, values)) for values in zip(*swept.values())]
    else:
        combos = [dict(zip(swept, values)) for values in itertools.product(*swept.values())]
    return [_experiment(c, axes) for axes in combos or [{}]]


def _experiment(c: ml_collections.ConfigDict, axes: dict) -> Experiment:
    get = lambda axis, default: axes.get(axis, default)
    after = c.selection.alpha if c.selection.alpha_after == -1 else c.selection.alpha_after
    alpha = get("alpha", (c.selection.alpha, after))
    alpha = tuple(alpha) * (2 // len(alpha)) if isinstance(alpha, (tuple, list)) else (alpha,) * 2
    exp = Experiment(
        axes=axes,
        malicious_fraction=float(get("malicious_fraction", c.attack.malicious_fraction)),
        flips=attacks.parse_flips(get("flips", c.attack.flips)),
        seed=int(get("seed", c.seed)),
        schedule=get("schedule", c.selection.schedule),
        alpha=(float(alpha[0]), float(alpha[1])),
        breakpoint=int(get("breakpoint", c.selection.breakpoint)),
    )
    _check_feasible(exp, c.num_clients, c.clients_per_round)
    return exp


def _check_feasible(exp: Experiment, num_clients: int, k: int) -> None:
    """Rejects schedules the client pools cannot honour (instead of silently bending them)."""
    bad = int(round(exp.malicious_fraction * num_clients))
    good = num_clients - bad
    where = f"(experiment {exp.axes})" if exp.axes else ""
    if exp.schedule in ("early", "late") and good < k:
        raise ConfigError(
            f"selection.schedule={exp.schedule!r} needs >= clients_per_round ({k}) honest "
            f"clients outside its window, got {good} {where}".rstrip()
        )
    if exp.schedule == "availability":
        for alpha in exp.alpha:
            if alpha * k > bad or (1 - alpha) * k > good:
                raise ConfigError(
                    f"selection.alpha={alpha} asks for {alpha * k:g} malicious and "
                    f"{(1 - alpha) * k:g} honest clients per round, but there are {bad} "
                    f"malicious and {good} honest clients {where}".rstrip()
                )


def scenario(exp: Experiment, c: ml_collections.ConfigDict, num_classes: int) -> Scenario:
    """The arrays of one experiment (host numpy; stacked and put on device by the caller)."""
    end = c.num_rounds if c.attack.end_round == -1 else c.attack.end_round
    return Scenario(
        seed=np.int32(exp.seed),
        malicious=attacks.draw_malicious(exp.seed, c.num_clients, exp.malicious_fraction),
        flip=attacks.flip_table(exp.flips, num_classes),
        schedule=np.int32(selection.SCHEDULES.index(exp.schedule)),
        breakpoint=np.int32(exp.breakpoint),
        alpha=np.asarray(exp.alpha, np.float32),
        poison_window=np.asarray([c.attack.start_round, end, c.attack.every], np.int32),
    )


def stack(scenarios: list[Scenario]) -> Scenario:
    """Scenarios [E] on a leading axis."""
    return jax.tree.map(lambda *leaves: np.stack(leaves), *scenarios)


def label(exp: Experiment) -> str:
    """A short human-readable name, e.g. 'malicious_fraction=0.1 flips=6:0 seed=1'."""
    parts = [
        f"{k}={attacks.format_flips(exp.flips) if k == 'flips' else v}" for k, v in exp.axes.items()
    ]
    return " ".join(parts) or "single"
