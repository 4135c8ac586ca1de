"""The numbers a report stands on: stable measures over a run's last evaluations, and
statistics across seeds.

A final round's value swings with chance: which of its k clients happened to be
malicious decides the source recall of that one model. A *stable* measure is the mean
over the last W evaluations of an experiment instead, W = `eval_window` of the config,
or by default the evaluations that fall in the last 10% of the rounds (at least one).

Across seeds: mean, sample std (n - 1), n and the half-width of a 95% confidence
interval for the mean from Student's t with n - 1 degrees of freedom (NaN for n < 2).
Only finite values count; n says how many did.
"""

import math
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np
from scipy import stats as scipy_stats

from fedjax_poison.config.window import (  # noqa: F401  (the one definition, re-exported)
    AUTO_SHARE,
    auto_window,
    evaluation_rounds,
    window_size,
)


class Spread(NamedTuple):
    """Mean, sample std, count and 95% CI half-width of some values (NaN where undefined)."""

    mean: float
    std: float
    n: int
    ci95: float


class Curve(NamedTuple):
    """A metric over rounds, over seeds: rounds [T], mean [T], ci95 [T] and n [T]."""

    rounds: np.ndarray
    mean: np.ndarray
    ci95: np.ndarray
    n: np.ndarray


def detection_ratios(tp: int, fp: int, fn: int) -> tuple[float | None, float | None]:
    """(precision, recall) of flags; None where undefined (nobody flagged; no attacker)."""
    return (tp / (tp + fp) if tp + fp else None, tp / (tp + fn) if tp + fn else None)


def as_float(value) -> float:
    """A metric value as a float: None (NaN written as null) becomes NaN."""
    return math.nan if value is None else float(value)


def tail_mean(series: Mapping[int, float], window: int) -> float:
    """Mean of the values of the last `window` rounds of a {round: value} series (NaN if
    it is empty or one of them is NaN)."""
    last = sorted(series)[-window:]
    return float(np.mean([series[r] for r in last])) if last else math.nan


def final(series: Mapping[int, float]) -> float:
    """The value of the last round of a {round: value} series (NaN if empty)."""
    return series[max(series)] if series else math.nan


def window_gap(series: Mapping[int, float], reference: Mapping[int, float], window: int):
    """Mean of reference - series over the last `window` rounds of `series` that the
    reference also has (NaN if none)."""
    last = [r for r in sorted(series)[-window:] if r in reference]
    return float(np.mean([reference[r] - series[r] for r in last])) if last else math.nan


def window_reference(series: Mapping[int, float], reference: Mapping[int, float], window: int):
    """Mean of the reference over the last `window` rounds of `series` that it also has
    (NaN if none): the baseline window_gap compares with."""
    last = [r for r in sorted(series)[-window:] if r in reference]
    return float(np.mean([reference[r] for r in last])) if last else math.nan


def distinguishable(mean: float, ci95: float) -> bool | None:
    """Whether a mean difference is told apart from 0 by its 95% interval (mean ± ci95
    leaves 0 out); None where there is no interval (one seed) or no value."""
    if not (math.isfinite(mean) and math.isfinite(ci95)):
        return None
    return bool(abs(mean) > ci95)


def spread(values: Sequence[float]) -> Spread:
    """Mean, sample std (n - 1), n and Student-t 95% CI half-width of the finite values."""
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], np.float64)
    n = len(v)
    mean = float(v.mean()) if n else math.nan
    if n < 2:
        return Spread(mean, math.nan, n, math.nan)
    std = float(v.std(ddof=1))
    return Spread(mean, std, n, t_quantile(n - 1) * std / math.sqrt(n))


def t_quantile(dof: int) -> float:
    """The 97.5% quantile of Student's t with `dof` degrees of freedom (12.706 for 1)."""
    return float(scipy_stats.t.ppf(0.975, dof))


def paired_differences(values: Mapping, reference: Mapping) -> list[float]:
    """values[key] - reference[key] for every key (a seed) both have a finite value for."""
    both = [k for k in values if k in reference]
    diffs = [values[k] - reference[k] for k in both]
    return [d for d in diffs if math.isfinite(d)]


def mean_curve(series: Sequence[Mapping[int, float]]) -> Curve:
    """Mean and 95% CI over several {round: value} series, at every round any of them has.

    A round counts the finite values it has (n); the CI is NaN where n < 2.
    """
    rounds = sorted({r for s in series for r in s})
    stats = [spread([s[r] for s in series if r in s]) for r in rounds]
    return Curve(
        rounds=np.asarray(rounds, np.int64),
        mean=np.asarray([s.mean for s in stats], np.float64),
        ci95=np.asarray([s.ci95 for s in stats], np.float64),
        n=np.asarray([s.n for s in stats], np.int64),
    )


def over_seeds(
    entries: Sequence[Mapping], keys: Sequence[str], carry: Sequence[str], metrics: Sequence[str]
) -> list[dict]:
    """Entries (one per experiment) grouped by `keys`, in order of appearance.

    Each group: its keys, the `carry` fields of its first entry, `seeds` (how many),
    `diverged` (how many have a `diverged` round), `diverged_rounds`, `experiments`, and
    `<metric>_mean`, `_std`, `_n`, `_ci95` of every metric (see spread: diverged entries
    hold NaN, so they are left out and n counts the others).
    """
    groups: dict[tuple, list[Mapping]] = {}
    for entry in entries:
        groups.setdefault(tuple(entry[k] for k in keys), []).append(entry)
    out = []
    for members in groups.values():
        row = {k: members[0][k] for k in (*keys, *carry)}
        rounds = [m["diverged"] for m in members if m.get("diverged") is not None]
        row.update(seeds=len(members), diverged=len(rounds), diverged_rounds=rounds)
        row["experiments"] = [m["experiment"] for m in members]
        for metric in metrics:
            spread_ = spread([m[metric] for m in members])
            row.update({f"{metric}_{part}": getattr(spread_, part) for part in Spread._fields})
        out.append(row)
    return out
