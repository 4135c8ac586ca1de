"""The sweep axes: `sweep.<axis>` lists values of one experiment setting.

Each axis is one entry of AXES: how a value is checked, what it sets in an experiment, its
value when not swept, and when it changes anything. Adding an axis is one entry here and
a field of `experiments.Experiment` (and, if the round must see it, of `Scenario`).

An axis that changes no experiment of the sweep (e.g. `sweep.alpha` without the
'availability' schedule) is refused; combinations that come out identical (e.g. the clean
twins of several flips) run once.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

from fedjax_poison import attacks
from fedjax_poison.config.fields import (
    ConfigError,
    check,
    is_int,
    is_number,
    validate_attack_name,
    validate_defense_name,
    validate_flips,
)
from fedjax_poison.round import selection


class Axis(NamedTuple):
    """One sweep axis; `c` is the run's config, `exp` an experiments.Experiment."""

    check: Callable[[Any, Any], None]  # (value, c): raises ConfigError naming sweep.<axis>
    convert: Callable[[Any], Any]  # value -> the experiment field's value
    default: Callable[[Any], Any]  # c -> the field's value when the axis is not swept
    matters: Callable[[Any], bool]  # exp -> whether the field changes that experiment
    inert: str  # when the axis changes nothing (for the message refusing it)


def attacked(exp) -> bool:
    """Whether the experiment has attackers that do something."""
    return exp.malicious_fraction > 0 and exp.attack != "none"


def _check_fraction(value, c) -> None:
    ok = is_number(value) and 0 <= value <= 1
    check(ok, "sweep.malicious_fraction", "values must be in [0, 1]", value)
    check(
        value == 0 or round(value * c.num_clients) > 0,
        "sweep.malicious_fraction",
        f"values must give at least one of {c.num_clients} clients (0 for none)",
        value,
    )


def _check_seed(value, c) -> None:
    ok = is_int(value) and -(2**31) <= value < 2**31
    check(ok, "sweep.seed", "values must be integers (int32)", value)


def _check_schedule(value, c) -> None:
    ok = isinstance(value, str) and value in selection.SCHEDULES
    check(ok, "sweep.schedule", f"values must be in {selection.SCHEDULES}", value)


def _check_alpha(value, c) -> None:
    pair = value if isinstance(value, (tuple, list)) else (value,)
    check(
        all(is_number(a) and 0 <= a <= 1 for a in pair) and len(pair) in (1, 2),
        "sweep.alpha",
        "values must be alpha or (alpha_before, alpha_after) in [0, 1]",
        value,
    )


def _check_breakpoint(value, c) -> None:
    ok = is_int(value) and 1 <= value < 2**31
    check(ok, "sweep.breakpoint", "values must be round numbers >= 1", value)


def _alpha_pair(value) -> tuple[float, float]:
    pair = tuple(value) if isinstance(value, (tuple, list)) else (value,)
    pair = pair * (2 // len(pair))
    return float(pair[0]), float(pair[1])


def _default_alpha(c) -> tuple[float, float]:
    after = c.selection.alpha if c.selection.alpha_after == -1 else c.selection.alpha_after
    return float(c.selection.alpha), float(after)


def uses_flips(exp) -> bool:
    """Whether the experiment's attack flips labels (its `flips`: the pairs it flips)."""
    return attacked(exp) and bool(exp.flips)


def uses_breakpoint(exp) -> bool:
    """Whether the experiment's selection changes at its breakpoint round."""
    return attacked(exp) and (
        exp.schedule in ("early", "late")
        or (exp.schedule == "availability" and exp.alpha[0] != exp.alpha[1])
    )


AXES: dict[str, Axis] = {
    "malicious_fraction": Axis(
        _check_fraction, float, lambda c: float(c.attack.malicious_fraction), lambda e: True, ""
    ),
    "flips": Axis(
        lambda v, c: validate_flips(v, _num_classes(c), "sweep.flips"),
        attacks.parse_flips,
        lambda c: attacks.parse_flips(c.attack.flips),
        uses_flips,
        "only label_flip (mapping 'pairs') and adaptive_flip flip the `flips` pairs, and only "
        "with attackers",
    ),
    "seed": Axis(_check_seed, int, lambda c: int(c.seed), lambda e: True, ""),
    "schedule": Axis(
        _check_schedule,
        str,
        lambda c: c.selection.schedule,
        attacked,
        "the schedule decides when malicious clients train: it needs attackers",
    ),
    "alpha": Axis(
        _check_alpha,
        _alpha_pair,
        _default_alpha,
        lambda e: attacked(e) and e.schedule == "availability",
        "alpha applies to selection.schedule='availability' only, with attackers",
    ),
    "breakpoint": Axis(
        _check_breakpoint,
        int,
        lambda c: int(c.selection.breakpoint),
        uses_breakpoint,
        "the breakpoint applies to the schedules 'early' and 'late', and to 'availability' "
        "with different alphas before and after it",
    ),
    "attack": Axis(
        lambda v, c: validate_attack_name(c, v, "sweep.attack"),
        str,
        lambda c: c.attack.name,
        lambda e: e.malicious_fraction > 0,
        "an attack needs attackers: attack.malicious_fraction is 0",
    ),
    "defense": Axis(
        lambda v, c: validate_defense_name(c, v, "sweep.defense", _num_classes(c)),
        str,
        lambda c: c.defense.name,
        lambda e: True,
        "",
    ),
}


def _num_classes(c) -> int:
    from fedjax_poison import data

    return data.SPECS[c.dataset].num_classes


def swept(c) -> dict[str, tuple]:
    """The non-empty sweep axes of a config, in AXES order."""
    return {axis: tuple(c.sweep[axis]) for axis in AXES if len(c.sweep[axis])}


def validate(c) -> None:
    """Checks `sweep.*`: the mode, each value, no value twice, zip lengths."""
    sw = c.sweep
    check(sw.mode in ("product", "zip"), "sweep.mode", "must be product or zip", sw.mode)
    check(sw.max_parallel >= 0, "sweep.max_parallel", "must be >= 0", sw.max_parallel)
    axes = swept(c)
    if sw.mode == "zip":
        lengths = {axis: len(values) for axis, values in axes.items()}
        check(len(set(lengths.values())) <= 1, "sweep", "zip axes must have equal lengths", lengths)
    for axis, values in axes.items():
        for value in values:
            AXES[axis].check(value, c)
        converted = [repr(AXES[axis].convert(v)) for v in values]
        twice = sorted({v for v in converted if converted.count(v) > 1})
        if twice and sw.mode == "product":
            raise ConfigError(f"sweep.{axis} lists {twice[0]} twice: each value runs once")


def refuse_inert(axes: dict[str, tuple], exps: list) -> None:
    """Raises ConfigError for a swept axis that changes none of the experiments."""
    for axis, values in axes.items():
        distinct = {repr(AXES[axis].convert(v)) for v in values}
        if len(distinct) > 1 and not any(AXES[axis].matters(e) for e in exps):
            raise ConfigError(f"sweep.{axis} changes no experiment: {AXES[axis].inert}")
