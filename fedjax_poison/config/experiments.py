"""A config's sweep expanded into experiments, and each experiment into a Scenario.

A run is a list of experiments (one when nothing is swept); their scenarios stack on
a leading experiment axis [E] and advance together in one compiled program. Experiments
are canonical: what does not apply to an experiment (a flip without label flipping, a
schedule without attackers) is set to one neutral value, so that identical experiments
are recognised and run once.
"""

import dataclasses
import itertools
import logging
from typing import NamedTuple

import jax
import numpy as np

from fedjax_poison import attacks
from fedjax_poison.config import sweeps
from fedjax_poison.config.fields import ConfigError
from fedjax_poison.round import selection
from fedjax_poison.round.simulation import Scenario

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Experiment:
    """One experiment: a value per sweep axis, read as `exp.<axis>` (`exp.seed`, `exp.flips`,
    ...: sweeps.AXES says what each holds); `axes` holds the swept ones as the config gives
    them (for labels)."""

    values: dict  # axis -> its value, in sweeps.AXES order
    axes: dict = dataclasses.field(default_factory=dict)

    def __getattr__(self, name: str):
        values = self.__dict__.get("values", {})
        if name not in values:
            raise AttributeError(f"an Experiment has no axis or attribute {name!r}")
        return values[name]

    def replace(self, **changes) -> "Experiment":
        """The experiment with some axes set to other values."""
        unknown = set(changes) - set(self.values)
        if unknown:
            raise TypeError(f"not sweep axes: {sorted(unknown)}")
        return Experiment({**self.values, **changes}, self.axes)

    def settings(self) -> tuple:
        """Every axis and its value: equal settings make equal experiments."""
        return tuple(self.values.items())


def expand(c) -> list[Experiment]:
    """The experiments of a config: the product (or zip) of its non-empty sweep axes,
    canonical, each distinct one once (in order of first appearance)."""
    axes = sweeps.swept(c)
    if c.sweep.mode == "zip":
        combos = [dict(zip(axes, values)) for values in zip(*axes.values())]
    else:
        combos = [dict(zip(axes, values)) for values in itertools.product(*axes.values())]
    raw = [_experiment(c, combo) for combo in combos or [{}]]
    sweeps.refuse_inert(axes, raw)
    for exp in raw:
        parts = attacks.split_name(exp.attack)
        pairs = bool(set(attacks.READ_FLIPS) & set(parts)) or (
            "label_flip" in parts and c.attack.label_flip.mapping == "pairs"
        )
        if sweeps.attacked(exp) and pairs and not exp.flips:
            raise ConfigError(
                f"attack.flips is empty: {exp.attack} with these settings flips nothing; "
                "set attack.flips (e.g. '6:0'), or attack.name='none' for no attack"
            )
    unique: dict[tuple, Experiment] = {}
    for exp in raw:
        exp = canonical(exp, c)
        unique.setdefault(exp.settings(), exp)
    exps = list(unique.values())
    if len(exps) < len(raw):
        log.info("%d combinations of the sweep are %d distinct experiments", len(raw), len(exps))
    for exp in exps:
        _check_feasible(exp, c.num_clients, c.clients_per_round)
    return exps


def _experiment(c, combo: dict) -> Experiment:
    values = {axis: spec.default(c) for axis, spec in sweeps.AXES.items()}
    values.update({axis: sweeps.AXES[axis].convert(v) for axis, v in combo.items()})
    exp = Experiment(values, combo)
    return exp.replace(flips=attacked_pairs(c, exp))


def attacked_pairs(c, exp: Experiment) -> attacks.Flips:
    """The (source, target) pairs the experiment's attack flips: its `flips` for label_flip's
    'pairs' mapping and attacks.READ_FLIPS, the mapping's own pairs for label_flip's others,
    () for attacks that flip no labels (their source recall is then undefined)."""
    parts = attacks.split_name(exp.attack)
    if "label_flip" in parts:
        lf = c.attack.label_flip
        from fedjax_poison import data

        num_classes = data.SPECS[c.dataset].num_classes
        return attacks.mapping_pairs(lf.mapping, exp.flips, lf.target, num_classes)
    return exp.flips if set(attacks.READ_FLIPS) & set(parts) else ()


def canonical(exp: Experiment, c) -> Experiment:
    """The experiment with settings that change nothing set to neutral values: without
    attackers, no attack, no flip and the 'always' schedule; alpha and the breakpoint of
    the config where the schedule does not use them."""
    if not sweeps.attacked(exp):
        exp = exp.replace(malicious_fraction=0.0, attack="none", flips=(), schedule="always")
    if not sweeps.AXES["alpha"].matters(exp):
        exp = exp.replace(alpha=sweeps.AXES["alpha"].default(c))
    if not sweeps.uses_breakpoint(exp):
        exp = exp.replace(breakpoint=sweeps.AXES["breakpoint"].default(c))
    return exp


def _check_feasible(exp: Experiment, num_clients: int, k: int) -> None:
    """Rejects schedules the client pools cannot honour (instead of silently bending them)."""
    bad = int(round(exp.malicious_fraction * num_clients))
    good = num_clients - bad
    where = f"(experiment {label(exp)})" if exp.axes else ""
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


def clean_twins(exps: list[Experiment], c) -> list[int | None]:
    """For each experiment, the one without attackers and every other setting equal (itself
    for an experiment without attackers), or None when the sweep has no such experiment."""
    index = {e.settings(): i for i, e in enumerate(exps)}
    twin = lambda e: canonical(e.replace(malicious_fraction=0.0), c).settings()
    return [index.get(twin(e)) for e in exps]


def measured_flips(exps: list[Experiment], twins: list[int | None]) -> list[attacks.Flips]:
    """The pairs each experiment's source recall and attack success rate are read on: its
    own flips, or for an experiment without attack those of the experiments whose clean
    twin it is, when they all flip the same pairs (its rates are then their reference)."""
    out = []
    for e, exp in enumerate(exps):
        dependents = {x.flips for x, t in zip(exps, twins) if t == e and x.flips}
        out.append(exp.flips or (dependents.pop() if len(dependents) == 1 else ()))
    return out


def attack_set(exps: list[Experiment]) -> list[str]:
    """The run's attacks, each once, in order of first use (scenario.attack indexes it)."""
    return list(dict.fromkeys(e.attack for e in exps))


def defense_set(exps: list[Experiment]) -> list[str]:
    """The run's defenses, each once, in order of first use (scenario.defense indexes it)."""
    return list(dict.fromkeys(e.defense for e in exps))


class Window(NamedTuple):
    """The rounds in which malicious clients poison: first and last (1-based), every n-th."""

    start: int
    end: int
    every: int


def scenario(
    exp: Experiment,
    exps: list[Experiment],
    window: Window,
    num_clients: int,
    num_classes: int,
) -> Scenario:
    """The arrays of one experiment of `exps` (host numpy; stacked and placed by the caller).

    The round counts from 0 inside the program: round r (1-based) has index r - 1.
    """
    return Scenario(
        seed=np.int32(exp.seed),
        malicious=attacks.draw_malicious(exp.seed, num_clients, exp.malicious_fraction),
        flip=attacks.flip_table(exp.flips, num_classes),
        schedule=np.int32(selection.SCHEDULES.index(exp.schedule)),
        breakpoint=np.int32(exp.breakpoint - 1),  # the index of the first round 'from' it
        alpha=np.asarray(exp.alpha, np.float32),
        # [first index, end index (exclusive), every]
        poison_window=np.asarray([window.start - 1, window.end, window.every], np.int32),
        attack=np.int32(attack_set(exps).index(exp.attack)),
        defense=np.int32(defense_set(exps).index(exp.defense)),
    )


def stack(scenarios: list[Scenario]) -> Scenario:
    """Scenarios [E] on a leading axis."""
    return jax.tree.map(lambda *leaves: np.stack(leaves), *scenarios)


def label(exp: Experiment) -> str:
    """A short human-readable name, e.g. 'malicious_fraction=0.1 flips=6:0 seed=1'."""
    return sweeps.label(exp.axes)
