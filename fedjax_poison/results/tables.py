"""A run's tables: one row per experiment, statistics across seeds, and results.md.

    results.csv          one row per experiment: its settings, the stable measures (means
                         over the last W evaluations, see stats), then `<metric>_final`,
                         the clean twin's value on the same rounds `<metric>_clean`, the
                         difference `<metric>_vs_clean`, and from records/ how many
                         attackers a round selected (`attackers_per_round`,
                         `rounds_with_attacker`)
    results_by_seed.csv  experiments equal in all but the seed, grouped: `<metric>_mean`,
                         `_std` (n - 1), `_n`, `_ci95` (Student t), and the paired difference
                         to the clean twin (same seed) `<metric>_vs_clean_mean/_ci95/_n`
                         and `_effect`: whether its 95% interval leaves 0 out, in words
    results.md           the same to read: mean ± CI95 with n, under a header saying what
                         ran; each attacked group beside its clean twin

The settings are the sweep axes (config/sweeps.AXES), in the order of their `column`:
experiments that differ in any of them are apart in every table; groups pool over the
`pooled` one (the seed). A diverged experiment has empty metric cells and its round in
`diverged`; it is left out of every mean, and n says how many seeds were used. NaN (no
flip, no twin) is an empty cell.
"""

import csv
import io
import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from fedjax_poison.config import sweeps
from fedjax_poison.results import stats

SERIES = ("accuracy", "source_recall", "attack_success_rate", "target_precision")
SERIES += ("other_accuracy",)
GAPS = {"source_recall_loss": "source_recall", "accuracy_drop": "accuracy"}  # twin - this
STABLE = ("accuracy", "source_recall", "attack_success_rate", "source_recall_loss")
STABLE += ("accuracy_drop", "other_accuracy", "target_precision")
FINAL = tuple(f"{m}_final" for m in STABLE)
VS_CLEAN = ("accuracy", "source_recall", "attack_success_rate")  # this - twin, same seed
CLEAN = tuple(f"{m}_clean" for m in VS_CLEAN)  # the twin's value on the same rounds
ATTACKERS = ("attackers_per_round", "rounds_with_attacker")  # from records/
METRICS = STABLE + FINAL + CLEAN + tuple(f"{m}_vs_clean" for m in VS_CLEAN) + ATTACKERS
DETECTION = ("detection_precision", "detection_recall")
INFO = ("measure", "clean_twin", "rounds_done", "diverged", "window")
DESCRIPTIONS = {
    "accuracy": "test accuracy",
    "source_recall": "recall of the attacked (source) class(es)",
    "attack_success_rate": "share of the attacked test images predicted as the target "
    "(flips: source-class images; backdoors: triggered images)",
    "source_recall_loss": "source recall of the clean twin minus this one's, on the same "
    "rounds; the clean twin is the experiment without attack and every other setting equal",
    "accuracy_drop": "accuracy of the clean twin minus this one's, on the same rounds",
    "other_accuracy": "mean recall of the classes that are neither a source nor a target",
    "target_precision": "precision of the target class(es)",
    "attackers_per_round": "malicious clients among a round's selected clients, mean over "
    "the rounds",
    "rounds_with_attacker": "share of the rounds that selected at least one malicious client",
}


class Run(NamedTuple):
    """What a report reads from a workdir (see report.read_run)."""

    name: str  # names the run in titles and combined tables (its folder's name)
    config: dict  # config.json
    experiments: list  # [E] dicts: settings(), label, measure, clean_twin, ... (experiments.json)
    rows: list  # [E] lists of the experiment's metrics rows, by round
    data_source: str  # the data used ('files' | 'tfds' | 'synthetic'), else the config's
    window: int  # W: evaluations a stable measure averages
    selections: dict  # experiment -> rounds in which a malicious client was selected
    attackers: dict | None = None  # experiment -> {round: malicious clients selected}


def settings() -> tuple[str, ...]:
    """An experiment's settings: the sweep axes, in the order of their columns."""
    return tuple(sorted(sweeps.AXES, key=lambda axis: sweeps.AXES[axis].column))


def group_keys() -> tuple[str, ...]:
    """The settings that keep groups apart: all but those groups pool over (the seed)."""
    return tuple(k for k in settings() if not sweeps.AXES[k].pooled)


def partition_words(config: dict) -> str:
    """'IID partition', 'dirichlet partition (alpha 0.5)': how the clients' data was split
    ('' where the config does not say)."""
    data = config.get("data", {})
    name = data.get("partition")
    if not name:
        return ""
    if name == "iid":
        return "IID partition"
    block = data.get(name) or {}
    values = ", ".join(f"{k} {v}" for k, v in block.items()) if isinstance(block, dict) else ""
    return f"{name} partition" + (f" ({values})" if values else "")


def class_names(dataset: str) -> tuple[str, ...]:
    """The dataset's class names (data.SPECS), or () for an unknown dataset."""
    from fedjax_poison import data  # imports jax: only when a name is needed

    spec = data.SPECS.get(dataset)
    return spec.class_names if spec else ()


def parse_flips(flips) -> list[tuple[int, int]]:
    """'6:0,1:3' (or [[6, 0], [1, 3]]) -> [(6, 0), (1, 3)]; '' or None -> []."""
    if not flips:
        return []
    if isinstance(flips, str):
        return [tuple(int(c) for c in pair.split(":")) for pair in flips.split(",")]
    return [(int(s), int(t)) for s, t in flips]


def is_clean(exp: dict) -> bool:
    """Whether an experiment (or a group of them) ran without attack."""
    fraction = float(exp["malicious_fraction"])
    return exp["measure"] == "none" or exp["attack"] == "none" or fraction == 0


def format_setting(key: str, value) -> str:
    """A setting (or a table cell again) as a table cell: its axis's `cell`, e.g. alpha
    '0.5' or '0/0.6' (before/from the breakpoint)."""
    axis = sweeps.AXES.get(key)
    return axis.cell(value) if axis else sweeps.plain_cell(value)


def row_value(row: dict, metric: str, pairs: Sequence[tuple[int, int]]) -> float:
    """One evaluation's metric; source_recall and other_accuracy from its per-class recall
    with the given flip pairs (so a clean twin is read on the attacked classes)."""
    recall = row.get("recall")
    if metric in ("source_recall", "other_accuracy") and recall and pairs:
        touched = {c for pair in pairs for c in pair}
        if metric == "source_recall":
            classes = [s for s, _ in pairs]
        else:
            classes = [c for c in range(len(recall)) if c not in touched]
        values = [stats.as_float(recall[c]) for c in classes]
        return float(np.mean(values)) if values else math.nan
    if metric in ("source_recall", "other_accuracy"):
        return math.nan  # no flip: no source class
    return stats.as_float(row.get(metric))


def series(rows: Sequence[dict], metric: str, pairs) -> dict[int, float]:
    """{round: value} of a metric over an experiment's rows (see row_value)."""
    return {r["round"]: row_value(r, metric, pairs) for r in rows}


def diverged_round(run: Run, e: int) -> int | None:
    """The round in which experiment e diverged, or None."""
    for r in run.rows[e]:
        if r.get("diverged"):
            return int(r.get("diverged_round") or r["round"])
    return run.experiments[e].get("diverged_round")


def measured_pairs(run: Run, e: int) -> list[tuple[int, int]]:
    """The pairs experiment e's source measures are read on: its flips, else twin_pairs."""
    return parse_flips(run.experiments[e]["flips"]) or twin_pairs(run, e)


def twin_pairs(run: Run, e: int) -> list[tuple[int, int]]:
    """The flips of the attacked experiments whose clean twin e is, if they all flip the
    same pairs (a clean row then shows its recall of their source classes), else []."""
    flips = {tuple(parse_flips(x["flips"])) for x in run.experiments if x.get("clean_twin") == e}
    flips.discard(())
    return list(flips.pop()) if len(flips) == 1 else []


def experiment_row(run: Run, e: int) -> dict:
    """Experiment e's settings, INFO and METRICS (NaN when undefined or diverged)."""
    exp, rows = run.experiments[e], run.rows[e]
    entry = {"run": run.name, "experiment": e, "label": exp["label"]}
    entry.update({k: format_setting(k, exp[k]) for k in settings()})
    twin = exp.get("clean_twin")
    entry.update(measure=exp["measure"], clean_twin="" if twin is None else twin)
    entry.update(rounds_done=max((r["round"] for r in rows), default=0), window=run.window)
    entry["diverged"] = diverged_round(run, e)
    entry.update({m: math.nan for m in METRICS})
    entry.update(attacker_counts((run.attackers or {}).get(e)))
    if entry["diverged"] is not None:
        return entry
    pairs = measured_pairs(run, e)
    mine = {m: series(rows, m, pairs) for m in SERIES}
    for m in SERIES:
        entry[m], entry[f"{m}_final"] = stats.tail_mean(mine[m], run.window), stats.final(mine[m])
    if twin is not None and diverged_round(run, twin) is None:
        twin_rows = run.rows[twin]
        for gap, m in GAPS.items():
            ref = series(twin_rows, m, pairs)
            entry[gap] = stats.window_gap(mine[m], ref, run.window)
            entry[f"{gap}_final"] = stats.window_gap(mine[m], ref, 1)
            entry[f"{m}_clean"] = stats.window_reference(mine[m], ref, run.window)
        entry["accuracy_vs_clean"] = -entry["accuracy_drop"]
        entry["source_recall_vs_clean"] = -entry["source_recall_loss"]
        backdoor = backdoor_baseline(run, e, twin)
        if backdoor or same_success_measure(run, e, twin, pairs):
            ref = backdoor or series(twin_rows, "attack_success_rate", pairs)
            gap = stats.window_gap(mine["attack_success_rate"], ref, run.window)
            entry["attack_success_rate_vs_clean"] = -gap
            entry["attack_success_rate_clean"] = stats.window_reference(
                mine["attack_success_rate"], ref, run.window
            )
    counts = rows[-1].get("detection") if rows else None
    if counts:  # from the counts, so that undefined ratios are NaN in any run's rows
        ratios = stats.detection_ratios(counts["tp"], counts["fp"], counts["fn"])
        entry.update({k: stats.as_float(v) for k, v in zip(DETECTION, ratios)})
    else:
        entry.update({k: math.nan for k in DETECTION})
    return entry


def same_success_measure(run: Run, e: int, twin: int, pairs) -> bool:
    """Whether the twin's attack_success_rate measures what e's flips do (the same pairs);
    a backdoor's baseline is backdoor_baseline."""
    if run.experiments[e]["measure"] == "backdoor":
        return False  # see backdoor_baseline
    return bool(pairs) and measured_pairs(run, twin) == pairs


def backdoor_baseline(run: Run, e: int, twin: int) -> dict[int, float]:
    """{round: the clean twin's rate of triggered images predicted as e's backdoor target}
    ({} where the rows do not hold it)."""
    target = run.experiments[e].get("backdoor_target", -1)
    if run.experiments[e]["measure"] != "backdoor" or target < 0:
        return {}
    rows = run.rows[twin]
    if not rows or any("triggered_to" not in r for r in rows):
        return {}
    rates = {r["round"]: r["triggered_to"] for r in rows}
    return {k: math.nan if v is None else stats.as_float(v[target]) for k, v in rates.items()}


def attacker_counts(counts: dict | None) -> dict:
    """attackers_per_round and rounds_with_attacker of {round: malicious selected} (NaN
    without records)."""
    if not counts:
        return {k: math.nan for k in ATTACKERS}
    values = np.asarray(list(counts.values()), np.float64)
    return {
        "attackers_per_round": float(values.mean()),
        "rounds_with_attacker": float((values > 0).mean()),
    }


def effect_words(mean: float, ci95: float, n: int) -> str:
    """What a paired difference to the clean twin says, in words: whether its 95% interval
    leaves 0 out."""
    seen = stats.distinguishable(mean, ci95)
    if seen is None:
        return "" if not math.isfinite(mean) else "one seed: no interval, run more seeds to tell"
    if not seen:
        return "not distinguishable from no attack"
    return "higher than without attack" if mean > 0 else "lower than without attack"


def experiment_table(run: Run) -> list[dict]:
    """One experiment_row per experiment of the run."""
    return [experiment_row(run, e) for e in range(len(run.experiments))]


def by_seed_table(table: Sequence[dict]) -> list[dict]:
    """Experiments equal in all but the seed, grouped (stats.over_seeds): seeds, diverged
    (how many), then mean, std, n and ci95 of every metric over the other seeds."""
    metrics = STABLE + FINAL + CLEAN + tuple(f"{v}_vs_clean" for v in VS_CLEAN) + ATTACKERS
    rows = stats.over_seeds(table, ("run", *group_keys()), ("measure",), metrics)
    for row in rows:
        for m in VS_CLEAN:
            row[f"{m}_vs_clean_effect"] = effect_words(
                *(row[f"{m}_vs_clean_{p}"] for p in ("mean", "ci95", "n"))
            )
    return rows


def varying(entries: Sequence[dict], keys: Sequence[str]) -> list[str]:
    """The keys whose values differ between entries."""
    return [k for k in keys if len({str(e[k]) for e in entries}) > 1]


def by_seed_columns() -> list[str]:
    """The columns of results_by_seed.csv after the settings."""
    cols = ["measure", "seeds", "diverged"]
    cols += [f"{m}_{p}" for m in STABLE + FINAL for p in ("mean", "std", "n", "ci95")]
    cols += [f"{m}_{p}" for m in CLEAN for p in ("mean", "ci95", "n")]
    cols += [f"{m}_vs_clean_{p}" for m in VS_CLEAN for p in ("mean", "ci95", "n")]
    cols += [f"{m}_vs_clean_effect" for m in VS_CLEAN]
    return cols + [f"{m}_mean" for m in ATTACKERS]


def experiment_columns(table: Sequence[dict]) -> list[str]:
    """The columns of results.csv (detection only where a rule flagged clients)."""
    detection = [k for k in DETECTION if any(math.isfinite(e.get(k, math.nan)) for e in table)]
    return ["experiment", "label", *settings(), *INFO, *METRICS, *detection]


def cell(value) -> str:
    """A CSV cell: NaN and None empty, floats with 6 significant digits."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def format_csv(rows: Sequence[dict], columns: Sequence[str]) -> str:
    """A header line, then one line per row; cells quoted where they need it."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows([[cell(row.get(c)) for c in columns] for row in rows])
    return out.getvalue()


def write_tables(run: Run, writer, table=None, by_seed=None) -> list[str]:
    """results.csv, results_by_seed.csv and results.md through writer.write_text."""
    table = experiment_table(run) if table is None else table
    by_seed = by_seed_table(table) if by_seed is None else by_seed
    files = {
        "results.csv": format_csv(table, experiment_columns(table)),
        "results_by_seed.csv": format_csv(by_seed, [*group_keys(), *by_seed_columns()]),
        "results.md": format_markdown(run, table, by_seed),
    }
    for name, text in files.items():
        writer.write_text(name, text)
    return list(files)


SHOWN = ("accuracy", "source_recall", "attack_success_rate", "source_recall_loss")
SHOWN += ("accuracy_drop", "other_accuracy")


def _num(value) -> str:
    return "" if not math.isfinite(value) else f"{value:.3f}"


def _pm(row: dict, metric: str) -> str:
    """'0.812 ± 0.004' (the ± part from two seeds on); '(n=k)' where n differs from the
    group's seeds used; '' when undefined."""
    mean, ci, n = (row[f"{metric}_{p}"] for p in ("mean", "ci95", "n"))
    if not math.isfinite(mean):
        return ""
    text = _num(mean) + (f" ± {ci:.3f}" if math.isfinite(ci) else "")
    return text + (f" (n={n})" if n != row["seeds"] - row["diverged"] else "")


def _md_table(header: Sequence[str], body: Sequence[Sequence[str]]) -> list[str]:
    """A Markdown table, leaving out the columns (after the first) that are empty."""
    keep = [i for i, _ in enumerate(header) if i == 0 or any(cells[i] for cells in body)]
    lines = ["| " + " | ".join(header[i] for i in keep) + " |", "|" + "---|" * len(keep)]
    return lines + ["| " + " | ".join(cells[i] for i in keep) + " |" for cells in body]


def _diverged(row: dict) -> str:
    rounds = ", ".join(str(r) for r in row["diverged_rounds"])
    return f"{row['diverged']} (round {rounds})" if row["diverged"] else ""


def seed_tables(by_seed: Sequence[dict], keys: Sequence[str]) -> list[str]:
    """Markdown: mean ± CI95 over seeds per group."""
    used = lambda row: row["seeds"] - row["diverged"]
    n = lambda row: str(used(row)) if not row["diverged"] else f"{used(row)} of {row['seeds']}"
    body = [
        [*(format_setting(k, row[k]) for k in keys), n(row), _diverged(row)]
        + [_pm(row, m) for m in SHOWN]
        for row in by_seed
    ]
    lines = ["## Across seeds: mean ± CI95", ""]
    return lines + _md_table([*keys, "n", "diverged", *SHOWN], body)


def against_clean(row: dict, metric: str) -> str:
    """'0.21 vs 0.18 clean: +0.03 ± 0.05, not distinguishable from no attack' ('' without
    a twin's value)."""
    diff, ci = row[f"{metric}_vs_clean_mean"], row[f"{metric}_vs_clean_ci95"]
    if not math.isfinite(diff):
        return ""
    mine, clean = row[f"{metric}_mean"], row[f"{metric}_clean_mean"]
    text = f"{_num(mine)} vs {_num(clean)} clean: {diff:+.3f}"
    text += f" ± {ci:.3f}" if math.isfinite(ci) else ""
    return f"{text}, {row[f'{metric}_vs_clean_effect']}"


def attackers_text(row: dict) -> str:
    """'1.2 a round, ≥ 1 in 70% of rounds' ('' without records)."""
    mean, share = row["attackers_per_round_mean"], row["rounds_with_attacker_mean"]
    if not math.isfinite(mean):
        return ""
    return f"{mean:.2f} a round, ≥ 1 in {share:.0%} of rounds"


def twin_lines(by_seed: Sequence[dict], keys: Sequence[str]) -> list[str]:
    """Markdown: each attacked group against its clean twin, paired by seed: this, the
    twin, the difference ± CI95 and whether it is told apart from 0; attackers a round."""
    rows = [r for r in by_seed if not is_clean(r) and any(r[f"{m}_vs_clean_n"] for m in VS_CLEAN)]
    if not rows:
        return []
    body = [
        [*(format_setting(k, row[k]) for k in keys), attackers_text(row)]
        + [against_clean(row, m) for m in VS_CLEAN]
        for row in rows
    ]
    lines = ["## Against the clean twin (no attack, same seeds): this vs clean, difference ± "
             "CI95 (paired by seed)", ""]  # fmt: skip
    return (
        lines
        + _md_table([*keys, "malicious clients selected", *VS_CLEAN], body)
        + [
            "",
            "A difference whose 95% interval holds 0 is not distinguishable from no attack: "
            "the attack did not measurably change that measure.",
        ]
    )


def experiment_lines(table: Sequence[dict], keys: Sequence[str]) -> list[str]:
    """Markdown: one row per experiment, the stable measures then two final-round ones."""
    final = ("accuracy_final", "source_recall_final")
    body = [
        [str(e["experiment"]), *(str(e[k]) for k in keys)]
        + ["" if e["diverged"] is None else f"round {e['diverged']}"]
        + [_num(e[m]) for m in (*SHOWN, *final)]
        for e in table
    ]
    lines = ["## Per experiment", ""]
    return lines + _md_table(["experiment", *keys, "diverged", *SHOWN, *final], body)


def setting_lines(run: Run) -> list[str]:
    """Markdown list items: each setting that changes some experiment, with its value(s);
    flips with class names."""
    names = class_names(run.config.get("dataset", ""))
    lines = []
    for key in settings():
        if not any(sweeps.applies(key, e) for e in run.experiments):
            continue
        values = list(dict.fromkeys(format_setting(key, e[key]) for e in run.experiments))
        if key == "flips":
            values = [f"{v} ({sweeps.flip_words(v, names)})" if v else "none" for v in values]
        lines.append(f"- {key}: {', '.join(values)}" + (" (swept)" if len(values) > 1 else ""))
    return lines


def header_lines(run: Run) -> list[str]:
    """What ran: dataset and the data used, settings, clients, rounds, W, the statistics."""
    c = run.config
    source = c.get("data", {}).get("source", "?")
    num_rounds, every = c.get("num_rounds"), c.get("eval_every")
    done = max((r["round"] for rows in run.rows for r in rows), default=0)
    window = ""
    if num_rounds and every:
        last = stats.evaluation_rounds(num_rounds, every)[-run.window :]
        window = f" (rounds {last[0]} to {last[-1]})" if len(last) > 1 else f" (round {last[0]})"
    return [
        f"# {run.name}: {c.get('dataset', '?')}, {len(run.experiments)} experiment(s)",
        "",
        f"- dataset: {c.get('dataset', '?')}; data source used: {run.data_source}"
        + (f" (config: data.source={source})" if source != run.data_source else ""),
        *setting_lines(run),
        f"- clients: {c.get('num_clients', '?')}, {c.get('clients_per_round', '?')} per round",
        f"- rounds: {num_rounds}, evaluated every {every}"
        + (f"; the run stopped after round {done}" if num_rounds and done < num_rounds else ""),
        f"- stable measures: the mean of each experiment's last W={run.window} evaluation"
        + ("s" if run.window > 1 else "")
        + window
        + "; `<metric>_final` in the CSV files is the last evaluation's value",
        "- across seeds: mean ± half-width of the 95% confidence interval (Student t, n - 1 "
        "degrees of freedom; none for n = 1); n: the seeds used (a diverged one is not)",
    ]


def format_markdown(run: Run, table: Sequence[dict], by_seed: Sequence[dict]) -> str:
    """results.md: the header, the tables across seeds (when there are several), the table
    per experiment, and what each column means."""
    keys = varying(by_seed, group_keys()) if len(by_seed) > 1 else []
    text = header_lines(run) + [""]
    if any(row["seeds"] > 1 for row in by_seed):
        text += seed_tables(by_seed, keys) + [""]
    twins = twin_lines(by_seed, keys or varying(by_seed, group_keys()))
    text += twins + [""] if twins else []
    text += experiment_lines(table, varying(table, settings())) + ["", "## Columns", ""]
    text += [f"- `{m}`: {DESCRIPTIONS[m]}." for m in (*STABLE, *ATTACKERS)]
    return "\n".join(text) + "\n"


def format_combined_markdown(runs: Sequence[Run], by_seed: Sequence[dict]) -> str:
    """combined_results.md: what each run is, then one table across seeds with a run column."""
    lines = [f"# {len(runs)} runs side by side", ""]
    for run in runs:
        c = run.config
        lines.append(
            f"- {run.name}: {c.get('dataset', '?')}, data source {run.data_source}, "
            f"{len(run.experiments)} experiment(s), {c.get('num_rounds', '?')} rounds, "
            f"W={run.window}"
        )
    keys = ["run", *varying(by_seed, group_keys())]
    return (
        "\n".join(
            lines + [""] + seed_tables(by_seed, keys) + [""] + twin_lines(by_seed, keys)
        ).rstrip()
        + "\n"
    )
