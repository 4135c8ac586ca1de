"""A run's report, rebuilt from the files of its workdir alone: tables, figures, and several
runs side by side.

Reads config.json, experiments.json (an older run's malicious.json, or the metrics rows
alone), metrics.jsonl, summary.json and records/ where they exist, so it works for an
interrupted run as for a finished one, and writes the tables (see tables) and figures (see
figures). With several runs it also writes combined_results.{csv,md},
combined_results_by_seed.csv and combined_curves.{png,pdf}. The run loop calls write_report
at its end; `python -m fedjax_poison.report` (fedjax_poison/report.py) is the command line.
"""

import contextlib
import glob
import json
import os
import zipfile
from collections.abc import Iterable, Sequence

import matplotlib

matplotlib.use("Agg")  # files only; never a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from fedjax_poison import errors  # noqa: E402
from fedjax_poison import files as files_lib  # noqa: E402
from fedjax_poison.config import sweeps  # noqa: E402
from fedjax_poison.results import figures, matrix_figures, stats, tables  # noqa: E402
from fedjax_poison.results import latex as latex_lib  # noqa: E402


class ReportError(errors.UserError):
    """A folder holds no run to report on, or cannot be written; the message says which."""


def read_json(path: str, default=None):
    """The JSON value in `path`; `default` when it is missing or damaged."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return default


def read_metrics(path: str) -> list[dict]:
    """The rows of metrics.jsonl; lines that are not a JSON object (a cut-off last line) are
    left out."""
    rows = []
    with contextlib.suppress(FileNotFoundError), open(path, encoding="utf-8") as f:
        for line in f:
            with contextlib.suppress(ValueError):
                row = json.loads(line)
                rows += [row] if isinstance(row, dict) and "round" in row else []
    return rows


def rows_by_experiment(rows: Iterable[dict], num_experiments: int) -> list[list[dict]]:
    """The rows [E] of each experiment by round ('experiment' absent: 0); a round written
    twice (a resumed run) keeps its last row."""
    mine = [{} for _ in range(num_experiments)]
    for r in rows:
        e = int(r.get("experiment", 0))
        if 0 <= e < num_experiments:
            mine[e][int(r["round"])] = r
    return [[m[k] for k in sorted(m)] for m in mine]


def guess_measure(exp: dict) -> str:
    """An older run's success measure (attacks.MEASURES) from its settings."""
    if exp["attack"] == "none" or float(exp["malicious_fraction"]) == 0:
        return "none"
    if exp["flips"]:
        return "flip"
    return "backdoor" if "backdoor" in exp["attack"] else "untargeted"


def normalize(entry: dict, config: dict, rows: Sequence[dict]) -> dict:
    """An experiments.json entry with every field tables need; what an older run lacks
    comes from its axes, its config (an axis it did not have: its default), and its rows
    (no source recall: no flips)."""
    recorded = {k: entry[k] for k in sweeps.AXES if k in entry}
    axes = entry.get("axes") or recorded
    exp = sweeps.read({**axes, **recorded}, config)
    if "flips" not in entry and rows and all(r.get("source_recall") is None for r in rows):
        exp["flips"] = ""
    exp.update(axes=axes, label=entry.get("label") or sweeps.label(axes))
    exp["measure"] = entry.get("measure") or guess_measure(exp)
    if "clean_twin" in entry:
        exp["clean_twin"] = entry["clean_twin"]
    exp["backdoor_target"] = int(entry.get("backdoor_target", -1))
    return exp


def find_clean_twin(exps: Sequence[dict], e: int) -> int | None:
    """For an older run: the experiment without attack, every other setting equal, and the
    same flips (or attack 'none') as e; None for a clean e."""
    me = exps[e]
    if tables.is_clean(me):
        return None
    keys = [k for k in sweeps.AXES if k not in ("malicious_fraction", "attack", "flips")]
    found = [
        i
        for i, o in enumerate(exps)
        if tables.is_clean(o)
        and all(o[k] == me[k] for k in keys)
        and (o["flips"] == me["flips"] or o["attack"] == "none")
    ]
    found.sort(key=lambda i: exps[i]["attack"] != me["attack"])
    return found[0] if found else None


def read_experiments(folder: str, config: dict, rows: Sequence[dict]) -> list[dict]:
    """The normalized experiments of a run, from experiments.json, else malicious.json and
    the rows."""
    entries = read_json(os.path.join(folder, "experiments.json"))
    if not (isinstance(entries, list) and entries):
        old = read_json(os.path.join(folder, "malicious.json")) or []
        seen = [int(r.get("experiment", 0)) for r in rows]
        count = max(len(old), 1 + max(seen, default=0))
        by_e = {int(x.get("experiment", i)): x for i, x in enumerate(old)}
        first = {}
        for r in rows:
            first.setdefault(int(r.get("experiment", 0)), r)
        entries = [
            {k: v for k, v in (by_e.get(e) or first.get(e) or {}).items() if k in sweeps.AXES}
            for e in range(count)
        ]
        entries = [{"axes": x} if x else {} for x in entries]
    return with_twins(entries, config, rows_by_experiment(rows, len(entries)))


def with_twins(entries: Sequence[dict], config: dict, rows: Sequence[list]) -> list[dict]:
    """The entries normalized, a clean twin found for those that do not name one."""
    exps = [normalize(x, config, r) for x, r in zip(entries, rows)]
    for e, exp in enumerate(exps):
        if "clean_twin" not in exp:
            exp["clean_twin"] = find_clean_twin(exps, e)
    return exps


def read_attackers(folder: str) -> dict[int, dict[int, int]]:
    """{experiment: {round: malicious clients selected}} from records/*.npz; {} without
    records."""
    found: dict[int, dict] = {}
    for path in sorted(glob.glob(os.path.join(folder, "records", "r*_e*.npz"))):
        try:
            with np.load(path) as z:
                exps, rounds = z["experiment"], z["round"]
                counts = np.asarray(z["malicious"]).astype(bool).sum(-1)  # [G, R]
        except (OSError, KeyError, ValueError, zipfile.BadZipFile):
            continue  # a chunk being written, or damaged: its marks are missing
        for g, e in enumerate(exps.tolist()):
            found.setdefault(int(e), {}).update(zip(rounds.tolist(), counts[g].tolist()))
    return found


def read_selections(folder: str) -> dict[int, list[int]]:
    """{experiment: rounds in which a malicious client was selected} from records/*.npz;
    {} without records."""
    return {e: sorted(r for r, n in c.items() if n) for e, c in read_attackers(folder).items()}


def read_run(path: str, window: int | None = None, name: str | None = None) -> tables.Run:
    """The run in workdir `path` (see tables.Run); W from `window`, else stats.window_size."""
    has = lambda f: os.path.exists(os.path.join(path, f))
    if not os.path.isdir(path) or not (has("config.json") or has("metrics.jsonl")):
        raise ReportError(f"{path} holds no run (no config.json, no metrics.jsonl): name a workdir")
    config = read_json(os.path.join(path, "config.json"), {})
    rows = read_metrics(os.path.join(path, "metrics.jsonl"))
    summary = read_json(os.path.join(path, "summary.json"), {})
    return make_run(path, config, read_experiments(path, config, rows), rows, summary,
                    window, name)  # fmt: skip


def make_run(path, config, exps, rows, summary, window=None, name=None) -> tables.Run:
    """A Run of normalized experiments and all metrics rows."""
    source = summary.get("data_source") or config.get("data", {}).get("source", "?")
    attackers = read_attackers(path)
    for item in summary.get("diverged") or []:  # for runs whose rows do not say so
        if 0 <= item.get("experiment", -1) < len(exps):
            exps[item["experiment"]].setdefault("diverged_round", item.get("round"))
    return tables.Run(
        name=name or os.path.basename(os.path.normpath(os.path.abspath(path))),
        config=config,
        experiments=exps,
        rows=rows_by_experiment(rows, len(exps)),
        data_source=source,
        window=stats.window_size(config, [r["round"] for r in rows], window),
        selections={e: sorted(r for r, n in c.items() if n) for e, c in attackers.items()},
        attackers=attackers,
    )


class FolderWriter:
    """Writes files into a folder, each atomically (a temporary file, then a rename)."""

    def __init__(self, path: str):
        self.path = path

    def write_bytes(self, name: str, data: bytes) -> None:
        path = os.path.join(self.path, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        files_lib.write_atomic(path, data)

    def write_text(self, name: str, text: str) -> None:
        self.write_bytes(name, text.encode("utf-8"))

    def write_json(self, name: str, obj) -> None:
        self.write_text(name, json.dumps(files_lib.clean(obj), indent=2) + "\n")


def write_run(run: tables.Run, writer, latex: bool = False) -> list[str]:
    """The tables and figures of a run through `writer` (and results.tex with `latex`);
    the names written."""
    table = tables.experiment_table(run)
    by_seed = tables.by_seed_table(table)
    files = tables.write_tables(run, writer, table, by_seed)
    if latex:
        writer.write_text("results.tex", latex_lib.format_latex(run, by_seed))
        files.append("results.tex")
    return files + write_figures(run, table, by_seed, writer)


def write_report(workdir_path: str, writer=None, window: int | None = None) -> list[str]:
    """Rebuilds the tables and figures of the run in workdir_path from its files, through
    `writer` (write_text, write_bytes; e.g. the run's workdir.Workdir), else straight into
    the workdir; returns the names written."""
    run = read_run(workdir_path, window)
    return write_run(run, writer or FolderWriter(workdir_path))


def write_combined(runs: Sequence[tables.Run], writer) -> list[str]:
    """Several runs side by side: one table with a `run` column, one figure of curves."""
    per_run = [tables.experiment_table(run) for run in runs]
    by_seed = [tables.by_seed_table(table) for table in per_run]
    every, groups = sum(per_run, []), sum(by_seed, [])
    texts = {
        "combined_results.csv": tables.format_csv(
            every, ["run", *tables.experiment_columns(every)]
        ),
        "combined_results_by_seed.csv": tables.format_csv(
            groups, ["run", *tables.group_keys(), *tables.by_seed_columns()]
        ),
        "combined_results.md": tables.format_combined_markdown(runs, groups),
    }
    for name, text in texts.items():
        writer.write_text(name, text)
    with plt.style.context(figures.STYLE):
        fig = matrix_figures.overlay_figure(runs, per_run, by_seed)
    return list(texts) + figures.save(fig, "combined_curves", writer)


def build_figures(run: tables.Run, table, by_seed) -> dict:
    """{name: figure} of a run: curves always (when it has evaluations), the others when
    their settings vary (see the module docstring)."""
    if not any(run.rows):
        return {}
    keys = set(tables.varying(by_seed, tables.group_keys()))
    with plt.style.context(figures.STYLE):
        made = {"curves": figures.curves_figure(run, table, by_seed)}
        if "malicious_fraction" in keys:
            made["source_recall_vs_fraction"] = figures.fraction_figure(run, table, by_seed)
        if keys & {"schedule", "alpha", "breakpoint"}:
            made["recall_over_rounds"] = figures.rounds_figure(run, table, by_seed)
        if len({r["attack"] for r in by_seed} - {"none"}) > 1 or "defense" in keys:
            made["matrix"] = matrix_figures.matrix_figure(run, table, by_seed)
    return made


def write_figures(run: tables.Run, table, by_seed, writer) -> list[str]:
    """Every figure of build_figures, as PNG and PDF; the names written."""
    return [
        f
        for name, fig in build_figures(run, table, by_seed).items()
        for f in figures.save(fig, name, writer)
    ]
