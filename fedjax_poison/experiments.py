"""A config's sweep axes expanded into experiments, and each experiment into a Scenario.

A run is a list of experiments (one when nothing is swept); their scenarios stack on
a leading experiment axis [E] and advance together in one compiled program.
"""

import itertools
from typing import NamedTuple

import jax
import ml_collections
import numpy as np

from fedjax_poison import attacks, data, selection
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
    attack: str = "label_flip"  # a name of attacks.ATTACKS, or several joined by '+'
    defense: str = "fedavg"  # a name of defenses.DEFENSES


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
    attack = get("attack", c.attack.name)
    exp = Experiment(
        axes=axes,
        malicious_fraction=float(get("malicious_fraction", c.attack.malicious_fraction)),
        flips=attacked_pairs(c, attack, attacks.parse_flips(get("flips", c.attack.flips))),
        seed=int(get("seed", c.seed)),
        schedule=get("schedule", c.selection.schedule),
        alpha=(float(alpha[0]), float(alpha[1])),
        breakpoint=int(get("breakpoint", c.selection.breakpoint)),
        attack=attack,
        defense=get("defense", c.defense.name),
    )
    _check_feasible(exp, c.num_clients, c.clients_per_round)
    return exp


def attacked_pairs(
    c: ml_collections.ConfigDict, attack: str, flips: attacks.Flips
) -> attacks.Flips:
    """The (source, target) label pairs an attack flips: `flips` for label_flip's 'pairs'
    mapping and adaptive_flip, the mapping's pairs for the others, () for attacks that flip
    no labels (their source recall is then undefined)."""
    parts = attacks.split_name(attack)
    if "label_flip" in parts:
        lf = c.attack.label_flip
        return attacks.mapping_pairs(lf.mapping, flips, lf.target, c_num_classes(c))
    return flips if "adaptive_flip" in parts else ()


def c_num_classes(c: ml_collections.ConfigDict) -> int:
    return data.SPECS[c.dataset].num_classes


def attack_set(exps: list[Experiment]) -> list[str]:
    """The run's attacks, each once, in order of first use (scenario.attack indexes it)."""
    return list(dict.fromkeys(e.attack for e in exps))


def defense_set(exps: list[Experiment]) -> list[str]:
    """The run's defenses, each once, in order of first use (scenario.defense indexes it)."""
    return list(dict.fromkeys(e.defense for e in exps))


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


def scenario(
    exp: Experiment, c: ml_collections.ConfigDict, num_classes: int, exps: list[Experiment]
) -> Scenario:
    """The arrays of one experiment of `exps` (host numpy; stacked and placed by the caller)."""
    end = c.num_rounds if c.attack.end_round == -1 else c.attack.end_round
    return Scenario(
        seed=np.int32(exp.seed),
        malicious=attacks.draw_malicious(exp.seed, c.num_clients, exp.malicious_fraction),
        flip=attacks.flip_table(exp.flips, num_classes),
        schedule=np.int32(selection.SCHEDULES.index(exp.schedule)),
        breakpoint=np.int32(exp.breakpoint),
        alpha=np.asarray(exp.alpha, np.float32),
        poison_window=np.asarray([c.attack.start_round, end, c.attack.every], np.int32),
        attack=np.int32(attack_set(exps).index(exp.attack)),
        defense=np.int32(defense_set(exps).index(exp.defense)),
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
