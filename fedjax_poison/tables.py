"""A sweep's report: one table row per experiment, means over seeds, and the sweep's plots.

Reads the metrics rows of a run (one per experiment and evaluation, as in metrics.jsonl)
with the experiments they belong to, and writes into the workdir:

    results.csv          one row per experiment: its axes, then the final-round metrics
    results_by_seed.csv  the same grouped over seeds: `<metric>_mean`, `<metric>_std`, `seeds`
    results.md           both tables, mean ± std, and what each column means
    source_recall_vs_fraction.png   when malicious_fraction is swept
    recall_over_rounds.png          when schedule, alpha or breakpoint is swept

Std is the sample standard deviation over seeds (n - 1); it is empty for one seed.
A NaN (no clean twin, no flip) is an empty cell.
"""

import math
import os
from collections.abc import Sequence

import numpy as np

from fedjax_poison import attacks, data, experiments, report
from fedjax_poison.configuration import SWEEP_AXES
from fedjax_poison.report import plt

FINAL_METRICS = ("accuracy", "source_recall", "target_precision", "attack_success_rate")
METRICS = FINAL_METRICS + ("source_recall_loss", "other_accuracy")
_DESCRIPTIONS = {
    "accuracy": "test accuracy after the last round",
    "source_recall": "recall of the source class(es) after the last round",
    "target_precision": "precision of the target class(es) after the last round",
    "attack_success_rate": "share of source-class test examples predicted as the target",
    "source_recall_loss": "max over evaluations of (source recall of the clean twin - this "
    "one); the clean twin has malicious_fraction 0 and every other setting equal; empty "
    "when the sweep has none",
    "other_accuracy": "mean recall of the classes that are neither a source nor a target "
    "(close to the clean run's when the attack is targeted)",
}


def _nan(value) -> float:
    return float("nan") if value is None else float(value)


def uses_breakpoint(exp: experiments.Experiment) -> bool:
    """Whether the experiment's selection changes at its breakpoint round."""
    return exp.schedule in ("early", "late") or (
        exp.schedule == "availability" and exp.alpha[0] != exp.alpha[1]
    )


def axis_columns(exps: Sequence[experiments.Experiment]) -> list[str]:
    """The axes a table shows: the swept ones, `schedule` always, alpha/breakpoint if used."""
    swept = set(exps[0].axes)
    uses_alpha = any(e.schedule == "availability" for e in exps)
    shown = swept | {"schedule"}
    shown |= {"alpha"} if uses_alpha else set()
    shown |= {"breakpoint"} if any(uses_breakpoint(e) for e in exps) else set()
    return [axis for axis in SWEEP_AXES if axis in shown]


def axis_values(exp: experiments.Experiment) -> dict:
    """Every axis of an experiment as a table value; alpha 'before/after' when they differ."""
    before, after = exp.alpha
    return {
        "malicious_fraction": exp.malicious_fraction,
        "flips": attacks.format_flips(exp.flips),
        "seed": exp.seed,
        "schedule": exp.schedule,
        "alpha": f"{before:g}" if before == after else f"{before:g}/{after:g}",
        "breakpoint": exp.breakpoint,
        "attack": exp.attack,
        "defense": exp.defense,
    }


def clean_twin(exps: Sequence[experiments.Experiment], e: int) -> int | None:
    """The experiment with malicious_fraction 0 and every other setting equal to e's, if any."""
    mine = exps[e]._replace(axes={}, malicious_fraction=0.0)
    for i, other in enumerate(exps):
        if other.malicious_fraction == 0 and other._replace(axes={}) == mine:
            return i
    return None


def source_recall_loss(rows: Sequence[dict], clean_rows: Sequence[dict]) -> float:
    """Max over the evaluation rounds both have of clean minus this source recall."""
    clean = {r["round"]: _nan(r["source_recall"]) for r in clean_rows}
    gaps = [clean[r["round"]] - _nan(r["source_recall"]) for r in rows if r["round"] in clean]
    return float(np.max(gaps)) if gaps else float("nan")


def other_accuracy(recall: Sequence[float], flips: attacks.Flips) -> float:
    """Mean recall [C] of the classes that are neither a source nor a target of the flips."""
    touched = {c for pair in flips for c in pair}
    others = [_nan(r) for c, r in enumerate(recall or []) if c not in touched]
    return float(np.mean(others)) if others else float("nan")


def rows_by_experiment(rows: Sequence[dict], num_experiments: int) -> list[list[dict]]:
    """The rows [E] of each experiment, ordered by round (single runs carry no 'experiment')."""
    mine = [[] for _ in range(num_experiments)]
    for r in rows:
        mine[r.get("experiment", 0)].append(r)
    return [sorted(m, key=lambda r: r["round"]) for m in mine]


def experiment_table(rows: Sequence[dict], exps: Sequence[experiments.Experiment]) -> list[dict]:
    """One dict per experiment: 'experiment', every axis (see axis_values), then METRICS."""
    per_exp = rows_by_experiment(rows, len(exps))
    table = []
    for e, (exp, mine) in enumerate(zip(exps, per_exp)):
        entry = {"experiment": e, **axis_values(exp)}
        final = mine[-1] if mine else {}
        entry.update({m: _nan(final.get(m)) for m in FINAL_METRICS})
        twin = clean_twin(exps, e)
        entry["source_recall_loss"] = (
            float("nan") if twin is None else source_recall_loss(mine, per_exp[twin])
        )
        entry["other_accuracy"] = other_accuracy(final.get("recall", []), exp.flips)
        table.append(entry)
    return table


def aggregate_over_seeds(table: Sequence[dict], keys: Sequence[str]) -> list[dict]:
    """Experiments grouped by `keys` (in order of appearance): mean and std of each metric."""
    groups: dict[tuple, list[dict]] = {}
    for entry in table:
        groups.setdefault(tuple(entry[k] for k in keys), []).append(entry)
    out = []
    for key, members in groups.items():
        row = dict(zip(keys, key))
        row["seeds"] = len(members)
        for m in METRICS:
            values = np.asarray([entry[m] for entry in members], np.float64)
            row[f"{m}_mean"] = float(np.mean(values))
            row[f"{m}_std"] = float(np.std(values, ddof=1)) if len(values) > 1 else float("nan")
        out.append(row)
    return out


def _cell(value) -> str:
    if isinstance(value, float):
        return "" if not math.isfinite(value) else f"{value:.6g}"
    return str(value)


def format_csv(table: Sequence[dict], columns: Sequence[str]) -> str:
    """Comma-separated, a header line, NaN as an empty cell (no value here needs quoting)."""
    lines = [",".join(columns)]
    lines += [",".join(_cell(row[c]) for c in columns) for row in table]
    return "\n".join(lines) + "\n"


def _md_cell(value, std=None) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        return ""
    if std is not None and math.isfinite(std):
        return f"{value:.3f} ± {std:.3f}"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def _md_table(header: Sequence[str], body: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(cells) + " |" for cells in body]


def format_markdown(table, by_seed, axes: Sequence[str], config) -> str:
    """Both tables as Markdown, under a line saying what was run."""
    keys = [a for a in axes if a != "seed"]
    text = [
        f"# {config['dataset']}: {len(table)} experiment(s)",
        "",
        f"{config['num_clients']} clients, {config['clients_per_round']} per round, "
        f"{config['num_rounds']} rounds, data.source={config['data']['source']}.",
        "",
        "## Per experiment",
        "",
    ]
    fmt = lambda v: f"{v:g}" if isinstance(v, float) else str(v)
    text += _md_table(
        ["experiment", *axes, *METRICS],
        [
            [str(row["experiment"]), *(fmt(row[a]) for a in axes)]
            + [_md_cell(row[m]) for m in METRICS]
            for row in table
        ],
    )
    if any(row["seeds"] > 1 for row in by_seed):
        text += ["", "## Mean ± std over seeds", ""]
        text += _md_table(
            [*keys, "seeds", *METRICS],
            [
                [*(fmt(row[k]) for k in keys), str(row["seeds"])]
                + [_md_cell(row[f"{m}_mean"], row[f"{m}_std"]) for m in METRICS]
                for row in by_seed
            ],
        )
    text += ["", "## Columns", ""]
    text += [f"- `{m}`: {_DESCRIPTIONS[m]}." for m in METRICS]
    return "\n".join(text) + "\n"


def _legend_name(row: dict, keys: Sequence[str], class_names: Sequence[str]) -> str:
    parts = []
    for k in keys:
        if k == "flips":
            pairs = attacks.parse_flips(row[k])
            names = ", ".join(f"{class_names[s]}→{class_names[t]}" for s, t in pairs)
            parts.append(f"flip {row[k]} ({names})" if pairs else "no flip")
        elif k == "alpha" and "/" in row[k]:
            parts.append(f"alpha={row[k]} (before/from the breakpoint)")
        else:
            parts.append(f"{k}={row[k]:g}" if isinstance(row[k], float) else f"{k}={row[k]}")
    return ", ".join(parts) or "mean over seeds"


def _over_seeds(seeds: int) -> str:
    return f"mean ± std over {seeds} seeds" if seeds > 1 else "one seed"


def _varying(table: Sequence[dict], keys: Sequence[str]) -> list[str]:
    return [k for k in keys if len({row[k] for row in table}) > 1]


def plot_fraction(path: str, by_seed: Sequence[dict], line_keys, class_names, title) -> None:
    """Final source recall and accuracy vs malicious fraction, a line per group of line_keys."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharex=True)
    lines: dict[tuple, list[dict]] = {}
    for row in by_seed:
        lines.setdefault(tuple(row[k] for k in line_keys), []).append(row)
    for members in lines.values():
        members = sorted(members, key=lambda r: r["malicious_fraction"])
        x = [r["malicious_fraction"] for r in members]
        name = _legend_name(members[0], line_keys, class_names)
        for ax, metric in zip(axes, ("source_recall", "accuracy")):
            std = [0.0 if math.isnan(r[f"{metric}_std"]) else r[f"{metric}_std"] for r in members]
            mean = [r[f"{metric}_mean"] for r in members]
            ax.errorbar(x, mean, yerr=std, marker="o", capsize=3, label=name)
    for ax, ylabel in zip(axes, ("source-class recall (final round)", "test accuracy (final)")):
        ax.set_xlabel("malicious fraction of the clients")
        ax.set_ylabel(ylabel)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{title} ({_over_seeds(max(row['seeds'] for row in by_seed))})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_rounds(path, table, per_exp, exps, line_keys, class_names, title) -> None:
    """Source recall over rounds, mean over seeds (± std band), a line per group of line_keys."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    lines: dict[tuple, list[int]] = {}
    for entry in table:
        lines.setdefault(tuple(entry[k] for k in line_keys), []).append(entry["experiment"])
    for members in lines.values():
        n = min(len(per_exp[e]) for e in members)  # a run cut short has fewer
        rounds = [r["round"] for r in per_exp[members[0]][:n]]
        recall = np.asarray(
            [[_nan(r["source_recall"]) for r in per_exp[e][:n]] for e in members], np.float64
        )  # [seeds, evaluations]
        mean = recall.mean(0)
        (line,) = ax.plot(
            rounds, mean, label=_legend_name(table[members[0]], line_keys, class_names)
        )
        if len(members) > 1:
            std = recall.std(0, ddof=1)
            ax.fill_between(rounds, mean - std, mean + std, color=line.get_color(), alpha=0.15)
    for b in sorted({e.breakpoint for e in exps if uses_breakpoint(e)}):
        ax.axvline(b, color="black", linestyle=":", linewidth=1)
        ax.annotate(f"breakpoint (round {b})", (b, 0.02), rotation=90, fontsize=8)
    ax.set_xlabel("round")
    ax.set_ylabel("source-class recall")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"{title} ({_over_seeds(max(len(m) for m in lines.values()))})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_sweep_report(
    workdir: str, rows: list[dict], exps: list[experiments.Experiment], config
) -> None:
    """Writes the tables and, when their axes are swept, the plots of a run into workdir."""
    axes = axis_columns(exps)
    keys = [a for a in axes if a != "seed"]
    table = experiment_table(rows, exps)
    by_seed = aggregate_over_seeds(table, keys)
    stats = [f"{m}_{s}" for m in METRICS for s in ("mean", "std")]
    join = lambda name: os.path.join(workdir, name)
    report.write_text(join("results.csv"), format_csv(table, ["experiment", *axes, *METRICS]))
    report.write_text(join("results_by_seed.csv"), format_csv(by_seed, [*keys, "seeds", *stats]))
    report.write_text(join("results.md"), format_markdown(table, by_seed, axes, config))

    class_names = data.SPECS[config["dataset"]].class_names
    title = f"{config['dataset']}, {config['num_rounds']} rounds"
    swept = set(exps[0].axes)
    if "malicious_fraction" in swept:
        # The flip names its line even when it is the only one.
        line_keys = [
            k
            for k in keys
            if k != "malicious_fraction" and (k == "flips" or k in _varying(by_seed, [k]))
        ]
        plot_fraction(join("source_recall_vs_fraction.png"), by_seed, line_keys, class_names, title)
    if swept & {"schedule", "alpha", "breakpoint"}:
        per_exp = rows_by_experiment(rows, len(exps))
        line_keys = _varying(table, keys)
        plot_rounds(
            join("recall_over_rounds.png"), table, per_exp, exps, line_keys, class_names, title
        )
