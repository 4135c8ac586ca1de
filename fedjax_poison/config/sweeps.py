"""The sweep axes: `sweep.<axis>` lists values of one experiment setting.

Each axis is one entry of AXES: how a value is checked, what it sets in an experiment, its
value when not swept, when it changes anything, and how the results record and show it.
Everything else derives from AXES: the config's `sweep` block, the settings of an
`experiments.Experiment` (`exp.<axis>`), experiments.json, the columns and groups of the
tables, labels, and the figures' titles and legends. Adding an axis is one entry here (and,
if the round must see it, a field of `Scenario`).

An axis that changes no experiment of the sweep (e.g. `sweep.alpha` without the
'availability' schedule) is refused; combinations that come out identical (e.g. the clean
twins of several flips) run once.
"""

import types
from collections.abc import Callable, Mapping, Sequence
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


def plain_cell(value) -> str:
    """A recorded value as a table cell: floats as '%g', anything else as str."""
    return f"{value:g}" if isinstance(value, float) else str(value)


class Axis(NamedTuple):
    """One sweep axis; `c` is the run's config, `exp` an experiments.Experiment.

    The fields after `inert` say how the results record and show the axis; their defaults
    suit an axis of plain values (a number or a name).
    """

    check: Callable[[Any, Any], None]  # (value, c): raises ConfigError naming sweep.<axis>
    convert: Callable[[Any], Any]  # value (or a recorded one) -> the experiment's value
    # c -> the experiment's value when the axis is not swept; c may also be a config.json
    # read back, of an older run that lacks the field (use `setting`)
    default: Callable[[Any], Any]
    matters: Callable[[Any], bool]  # exp -> whether the value changes that experiment
    inert: str  # when the axis changes nothing (for the message refusing it)
    record: Callable[[Any], Any] = lambda value: value  # experiment's value -> JSON
    cell: Callable[[Any], str] = plain_cell  # recorded value (or a cell) -> a table cell
    # (cell, the dataset's class names) -> words for figures; None: '<axis> <cell>'
    words: Callable[[str, Sequence[str]], str] | None = None
    quiet: str | None = None  # a cell that titles leave unsaid (the usual value)
    pooled: bool = False  # tables pool experiments over its values (statistics across seeds)
    column: int = 100  # tables and titles list the axes by column
    hue: int = 100  # figures colour lines by the varying axis of lowest hue
    ordered: bool = False  # its values are ordered: sequential colours


def setting(c, path: str, fallback):
    """The value of the config `c` at a dotted path; `fallback` where c lacks it (a
    config.json of an older run)."""
    for key in path.split("."):
        if key not in c:
            return fallback
        c = c[key]
    return c


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
    check(
        value == 1 or round(value * c.num_clients) < c.num_clients,
        "sweep.malicious_fraction",
        f"values below 1 must leave an honest client: {value} of {c.num_clients} clients "
        f"makes all of them malicious",
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
    alpha, after = setting(c, "selection.alpha", 0.5), setting(c, "selection.alpha_after", -1)
    return float(alpha), float(alpha if after == -1 else after)


def _alpha_cell(value) -> str:
    """'0.5', or '0/0.6' for alpha before/from the breakpoint; a cell stays as it is."""
    if isinstance(value, str):
        return value
    before, after = value if isinstance(value, (list, tuple)) else (value, value)
    return f"{before:g}" if before == after else f"{before:g}/{after:g}"


def parse_flips(value) -> attacks.Flips:
    """'6:0,1:3', ['6:0', '1:3'] or [[6, 0], [1, 3]] -> ((6, 0), (1, 3)); '' -> ()."""
    if isinstance(value, str):
        return attacks.parse_flips(value)
    return tuple(
        attacks.parse_flips(pair)[0] if isinstance(pair, str) else (int(pair[0]), int(pair[1]))
        for pair in value or ()
    )


def flip_words(cell: str, names: Sequence[str]) -> str:
    """'Shirt→T-shirt/top' for flips '6:0' (class numbers without names); 'no flip'."""
    name = lambda c: names[c] if c < len(names) else str(c)
    pairs = parse_flips(cell)
    return ", ".join(f"{name(s)}→{name(t)}" for s, t in pairs) if pairs else "no flip"


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
        _check_fraction,
        float,
        lambda c: float(setting(c, "attack.malicious_fraction", 0.0)),
        lambda e: True,
        "",
        words=lambda cell, names: f"{100 * float(cell):g}% malicious",
        column=2,
        hue=0,
        ordered=True,
    ),
    # the (source, target) pairs the experiment's attack flips; () if none
    "flips": Axis(
        lambda v, c: validate_flips(v, _num_classes(c), "sweep.flips"),
        parse_flips,
        lambda c: parse_flips(setting(c, "attack.flips", "")),
        uses_flips,
        "only label_flip (mapping 'pairs'), adaptive_flip, edge_case and alt_min flip the "
        "`flips` pairs, and only "
        "with attackers",
        record=attacks.format_flips,
        words=flip_words,
        column=3,
        hue=6,
    ),
    "seed": Axis(
        _check_seed,
        int,
        lambda c: int(setting(c, "seed", 0)),
        lambda e: True,
        "",
        pooled=True,
        column=4,
    ),
    "schedule": Axis(
        _check_schedule,
        str,
        lambda c: setting(c, "selection.schedule", "always"),
        attacked,
        "the schedule decides when malicious clients train: it needs attackers",
        quiet="always",
        column=5,
        hue=2,
    ),
    # (before, from the breakpoint)
    "alpha": Axis(
        _check_alpha,
        _alpha_pair,
        _default_alpha,
        lambda e: attacked(e) and e.schedule == "availability",
        "alpha applies to selection.schedule='availability' only, with attackers",
        record=list,
        cell=_alpha_cell,
        words=lambda cell, names: f"alpha {cell.replace('/', '→')}",
        column=6,
        hue=1,
    ),
    # a round number: 'late' and alpha[1] apply from this round on
    "breakpoint": Axis(
        _check_breakpoint,
        int,
        lambda c: int(setting(c, "selection.breakpoint", 75)),
        uses_breakpoint,
        "the breakpoint applies to the schedules 'early' and 'late', and to 'availability' "
        "with different alphas before and after it",
        column=7,
        hue=3,
        ordered=True,
    ),
    # a name of attacks.ATTACKS, or several joined by '+'
    "attack": Axis(
        lambda v, c: validate_attack_name(c, v, "sweep.attack"),
        str,
        lambda c: setting(c, "attack.name", "label_flip"),
        lambda e: e.malicious_fraction > 0,
        "an attack needs attackers: attack.malicious_fraction is 0",
        words=lambda cell, names: "no attack" if cell == "none" else cell,
        column=0,
        hue=4,
    ),
    # a name of defenses.DEFENSES, or a chain joined by '+'
    "defense": Axis(
        lambda v, c: validate_defense_name(c, v, "sweep.defense", _num_classes(c)),
        str,
        lambda c: setting(c, "defense.name", "fedavg"),
        lambda e: True,
        "",
        column=1,
        hue=5,
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


def record(values: Mapping) -> dict:
    """An experiment's settings {axis: value} as experiments.json records them."""
    return {axis: spec.record(values[axis]) for axis, spec in AXES.items()}


def read(given: Mapping, config) -> dict:
    """An experiment's settings as experiments.json records them, from the values `given`
    for some axes (recorded, or as swept) and the defaults of the run's `config` (a
    ConfigDict, or config.json: an axis an older run lacks takes its default)."""
    return {
        axis: spec.record(spec.convert(given[axis]) if axis in given else spec.default(config))
        for axis, spec in AXES.items()
    }


def applies(axis: str, recorded: Mapping) -> bool:
    """Whether the axis changes the experiment with these recorded settings (its `matters`)."""
    exp = types.SimpleNamespace(**{k: spec.convert(recorded[k]) for k, spec in AXES.items()})
    return AXES[axis].matters(exp)


def label(axes: Mapping) -> str:
    """A short name from the swept values, e.g. 'malicious_fraction=0.1 flips=6:0 seed=1'."""
    shown = lambda k, v: attacks.format_flips(parse_flips(v)) if k == "flips" else v
    return " ".join(f"{k}={shown(k, v)}" for k, v in axes.items()) or "single"
