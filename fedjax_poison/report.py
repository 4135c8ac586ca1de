"""A run's report, rebuilt from the files of its workdir alone: tables, figures, and several
runs side by side.

    python -m fedjax_poison.report WORKDIR [WORKDIR ...] [--out=DIR] [--window=W]

reads config.json, experiments.json (an older run's malicious.json, or the metrics rows
alone), metrics.jsonl, summary.json and records/ where they exist, so it works for an
interrupted run as for a finished one, and writes the tables (see tables) and figures (see
figures) into each workdir, or into --out. With several workdirs it also writes
combined_results.{csv,md}, combined_results_by_seed.csv and combined_curves.{png,pdf}
(into --out, else the current folder). The run loop calls write_report at its end.
"""

import argparse
import contextlib
import glob
import json
import os
import sys
import zipfile
from collections.abc import Iterable, Sequence

import matplotlib

matplotlib.use("Agg")  # files only; never a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from fedjax_poison import errors, figures, figures_compare, stats, tables  # noqa: E402
from fedjax_poison import files as files_lib  # noqa: E402
from fedjax_poison import workdir as workdir_lib  # noqa: E402


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


def config_settings(config: dict) -> dict:
    """The settings (tables.SETTINGS) of an experiment that sweeps nothing."""
    attack, selection = config.get("attack", {}), config.get("selection", {})
    alpha, after = selection.get("alpha", 0.5), selection.get("alpha_after", -1)
    return {
        "attack": attack.get("name", "label_flip"),
        "defense": config.get("defense", {}).get("name", "fedavg"),
        "malicious_fraction": float(attack.get("malicious_fraction", 0.0)),
        "flips": attack.get("flips", ""),
        "seed": config.get("seed", 0),
        "schedule": selection.get("schedule", "always"),
        "alpha": [alpha, alpha if after == -1 else after],
        "breakpoint": selection.get("breakpoint", 75),
    }


def flips_text(flips) -> str:
    """'6:0,1:3' from a string, a list of strings or a list of [source, target] pairs."""
    if isinstance(flips, str) or not flips:
        return flips or ""
    if all(isinstance(f, str) for f in flips):
        return ",".join(flips)
    return ",".join(f"{s}:{t}" for s, t in flips)


def guess_measure(exp: dict) -> str:
    """An older run's success measure (attacks.MEASURES) from its settings."""
    if exp["attack"] == "none" or float(exp["malicious_fraction"]) == 0:
        return "none"
    if exp["flips"]:
        return "flip"
    return "backdoor" if "backdoor" in exp["attack"] else "untargeted"


def normalize(entry: dict, config: dict, rows: Sequence[dict]) -> dict:
    """An experiments.json entry with every field tables need; what an older run lacks
    comes from its axes, its config, and its rows (no source recall: no flips)."""
    axes = entry.get("axes") or {k: entry[k] for k in tables.SETTINGS if k in entry}
    exp = {k: entry.get(k, axes.get(k, v)) for k, v in config_settings(config).items()}
    exp["flips"] = flips_text(exp["flips"])
    if "flips" not in entry and rows and all(r.get("source_recall") is None for r in rows):
        exp["flips"] = ""
    alpha = exp["alpha"]
    exp["alpha"] = [float(a) for a in alpha] if isinstance(alpha, list) else [float(alpha)] * 2
    exp["malicious_fraction"] = float(exp["malicious_fraction"])
    label = " ".join(f"{k}={flips_text(v) if k == 'flips' else v}" for k, v in axes.items())
    exp.update(axes=axes, label=entry.get("label") or label or "single")
    exp["measure"] = entry.get("measure") or guess_measure(exp)
    if "clean_twin" in entry:
        exp["clean_twin"] = entry["clean_twin"]
    return exp


def find_clean_twin(exps: Sequence[dict], e: int) -> int | None:
    """For an older run: the experiment without attack and the same defense, seed,
    selection and flips (or attack 'none') as e; None for a clean e."""
    me = exps[e]
    if tables.is_clean(me):
        return None
    keys = ("defense", "seed", "schedule", "alpha", "breakpoint")
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
            {k: v for k, v in (by_e.get(e) or first.get(e) or {}).items() if k in tables.SETTINGS}
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


def read_selections(folder: str) -> dict[int, list[int]]:
    """{experiment: rounds in which a malicious client was selected} from records/*.npz;
    {} without records."""
    found: dict[int, set] = {}
    for path in sorted(glob.glob(os.path.join(folder, "records", "r*_e*.npz"))):
        try:
            with np.load(path) as z:
                exps, rounds = z["experiment"], z["round"]
                malicious = np.asarray(z["malicious"]).astype(bool).any(-1)  # [G, R]
        except (OSError, KeyError, ValueError, zipfile.BadZipFile):
            continue  # a chunk being written, or damaged: its marks are missing
        for g, e in enumerate(exps.tolist()):
            found.setdefault(int(e), set()).update(rounds[malicious[g]].tolist())
    return {e: sorted(r) for e, r in found.items()}


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
        selections=read_selections(path),
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


def write_run(run: tables.Run, writer) -> list[str]:
    """The tables and figures of a run through `writer`; the names written."""
    table = tables.experiment_table(run)
    by_seed = tables.by_seed_table(table)
    files = tables.write_tables(run, writer, table, by_seed)
    return files + figures.write_figures(run, table, by_seed, writer)


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
            groups, ["run", *tables.GROUP_KEYS, *tables.by_seed_columns()]
        ),
        "combined_results.md": tables.format_combined_markdown(runs, groups),
    }
    for name, text in texts.items():
        writer.write_text(name, text)
    with plt.style.context(figures.STYLE):
        fig = figures_compare.overlay_figure(runs, per_run, by_seed)
    return list(texts) + figures.save(fig, "combined_curves", writer)


def unique_names(paths: Sequence[str]) -> list[str]:
    """Each workdir's folder name; with its parent's where two are alike, then numbered."""
    parts = [os.path.normpath(os.path.abspath(p)).split(os.sep) for p in paths]
    names = [p[-1] for p in parts]
    if len(set(names)) < len(names):
        names = ["/".join(p[-2:]) for p in parts]
    if len(set(names)) < len(names):
        names = [f"{n} ({i})" for i, n in enumerate(names)]
    return names


@contextlib.contextmanager
def open_writer(workdir: str, dest: str):
    """A writer into dest: the run's own Workdir (listing the files it writes) when dest
    is a workdir with the run's marker, else a FolderWriter."""
    if os.path.abspath(dest) != os.path.abspath(workdir) or not os.path.exists(
        os.path.join(workdir, workdir_lib.MARKER)
    ):
        yield FolderWriter(dest)
        return
    try:
        claimed = workdir_lib.Workdir.attach(workdir)
    except workdir_lib.WorkdirError as e:
        raise ReportError(f"{e}; or write the report elsewhere with --out") from None
    with claimed:
        yield claimed


def main(argv: Sequence[str] | None = None) -> int:
    """The command line (see the module docstring); 0 on success, 2 on a user's error."""
    parser = argparse.ArgumentParser(
        prog="python -m fedjax_poison.report",
        description="Rebuild the tables and figures of runs from their workdirs.",
    )
    parser.add_argument("workdirs", nargs="+", help="workdirs of runs")
    parser.add_argument(
        "--out", help="write here instead of into each workdir, with several: side by side too"
    )
    parser.add_argument("--window", type=int, help="W: evaluations a stable measure averages")
    args = parser.parse_args(argv)
    try:
        if args.window is not None and args.window < 1:
            raise ReportError(f"--window must be 1 or more, got {args.window}")
        names = unique_names(args.workdirs)
        runs = [read_run(p, args.window, n) for p, n in zip(args.workdirs, names)]
        for path, run in zip(args.workdirs, runs):
            dest = args.out or path
            dest = os.path.join(dest, run.name) if args.out and len(runs) > 1 else dest
            with open_writer(path, dest) as writer:
                print(f"{dest}: {', '.join(write_run(run, writer))}")
        if len(runs) > 1 and args.out:
            print(f"{args.out}: {', '.join(write_combined(runs, FolderWriter(args.out)))}")
        elif len(runs) > 1:
            print("side by side in one table and figure: add --out=FOLDER")
    except (ReportError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
