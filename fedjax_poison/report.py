"""Rebuilds the tables and figures of runs from their workdirs alone, and several runs side
by side:

    python -m fedjax_poison.report WORKDIR [WORKDIR ...] [--out=DIR] [--window=W] [--latex]

writes into each workdir (the run's own files) or into --out; see results/report.py for
what is read and written. --latex adds results.tex (results/latex.py): booktabs tables of
the same numbers, mean ± CI95, for a paper. A run's files are checked first, as a resume
checks them: a missing metrics.jsonl, a damaged line or value, or a damaged records file
stops the report with one line naming the file, and nothing is written (good tables are
never replaced by tables from partial inputs). --out must name a new or empty folder, or
one this command wrote before (it holds the report's marker): nothing else in it is
replaced.
"""

import argparse
import contextlib
import glob
import json
import os
import sys
import zipfile
from collections.abc import Sequence

import numpy as np

from fedjax_poison import files, signals
from fedjax_poison.results.report import (
    FolderWriter,
    ReportError,
    read_run,
    write_combined,
    write_run,
)
from fedjax_poison.runner import workdir as workdir_lib

OUT_CONFIG = {"command": "fedjax_poison.report"}  # the marker's config in an --out folder
INTEGERS = ("num_rounds", "eval_every", "eval_window", "seed", "num_clients")
BLOCKS = ("data", "attack", "defense", "sweep", "model")


def unique_names(paths: Sequence[str]) -> list[str]:
    """Each workdir's folder name; with its parent's where two are alike, then numbered."""
    parts = [os.path.normpath(os.path.abspath(p)).split(os.sep) for p in paths]
    names = [p[-1] for p in parts]
    if len(set(names)) < len(names):
        names = ["/".join(p[-2:]) for p in parts]
    if len(set(names)) < len(names):
        names = [f"{n} ({i})" for i, n in enumerate(names)]
    return names


def _refuse(path: str, problem: str) -> ReportError:
    return ReportError(
        f"{files.show(path)} {problem}: the file was changed or damaged; fix or restore it "
        "(nothing was written)"
    )


def _json(path: str, kind: type, what: str):
    """The JSON value of `path` if it is a `kind`; None if missing; ReportError otherwise."""
    try:
        with open(path, "rb") as f:
            value = json.loads(f.read().decode("utf-8"))
    except FileNotFoundError:
        return None
    except OSError as e:
        raise ReportError(str(files.error(path, e, "read"))) from None
    except (ValueError, RecursionError):
        raise _refuse(path, "is not JSON") from None
    if not isinstance(value, kind):
        raise _refuse(path, f"holds a JSON {type(value).__name__}, not {what}")
    return value


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_run(path: str) -> None:
    """Raises ReportError naming the first file of the run in `path` a report cannot trust."""
    if not os.path.isdir(path):
        raise ReportError(
            f"{files.show(path)} holds no run (it is not a folder): name a run's workdir"
        )
    metrics = os.path.join(path, "metrics.jsonl")
    if not os.path.isfile(metrics):
        raise ReportError(
            f"{files.show(path)} has no metrics.jsonl, so no results to report (the tables "
            "there were left as they are): name a run's workdir"
        )
    try:
        rows = files.read_lines(metrics)  # strict, as a resume reads it
    except files.WorkdirError as e:
        raise ReportError(str(e)) from None
    for number, row in enumerate(rows, 1):
        for key in ("round", "experiment"):
            value = row.get(key, 0 if key == "experiment" else None)
            if not _whole(value) or value < (1 if key == "round" else 0):
                raise _refuse(metrics, f"line {number}: {key} is {files.short(value)}")
    config = _json(os.path.join(path, "config.json"), dict, "an object")
    for key in INTEGERS:
        value = (config or {}).get(key)
        if value is not None and not _whole(value):
            raise _refuse(os.path.join(path, "config.json"), f"{key} is {files.short(value)}")
    for key in BLOCKS:
        value = (config or {}).get(key)
        if value is not None and not isinstance(value, dict):
            raise _refuse(os.path.join(path, "config.json"), f"{key} is {files.short(value)}")
    _json(os.path.join(path, "summary.json"), dict, "an object")
    entries = _json(os.path.join(path, "experiments.json"), list, "a list")
    for i, entry in enumerate(entries or []):
        if not isinstance(entry, dict):
            problem = f"experiment {i} is {files.short(entry)}, not an object"
            raise _refuse(os.path.join(path, "experiments.json"), problem)
    for npz in sorted(glob.glob(os.path.join(glob.escape(path), "records", "*.npz"))):
        try:
            with np.load(npz, allow_pickle=False) as z:
                for key in z.files:
                    z[key]
        except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as e:
            problem = f"cannot be read ({type(e).__name__})"
            if os.path.getsize(npz) == 0:
                problem = "is empty"
            raise _refuse(npz, problem) from None


def read_checked(path: str, window: int | None, name: str):
    """The run in `path` (results.report.read_run), its files checked first (check_run)."""
    check_run(path)
    try:
        return read_run(path, window, name)
    except (TypeError, ValueError, KeyError, AttributeError, IndexError) as e:
        raise ReportError(
            f"{files.show(path)}: config.json, experiments.json or summary.json holds a value "
            f"of the wrong kind ({type(e).__name__}: {files.show(str(e))[:120]}): fix or "
            "restore it (nothing was written)"
        ) from None


class Prefixed:
    """A writer into sub-folder `prefix` of another writer."""

    def __init__(self, writer, prefix: str):
        self.writer, self.prefix = writer, prefix

    def write_bytes(self, name: str, data: bytes) -> None:
        self.writer.write_bytes(f"{self.prefix}/{name}", data)

    def write_text(self, name: str, text: str) -> None:
        self.writer.write_text(f"{self.prefix}/{name}", text)

    def write_json(self, name: str, obj) -> None:
        self.writer.write_json(f"{self.prefix}/{name}", obj)


def claim_out(out: str) -> workdir_lib.Workdir:
    """--out as a folder of this command: new, empty, or holding the report's marker."""
    path = os.path.abspath(os.path.expanduser(out))
    with contextlib.suppress(OSError, workdir_lib.WorkdirError):  # the claim names these
        marker = workdir_lib._read_marker(path) if os.path.isdir(path) else None
        if marker is not None and marker["config"] != OUT_CONFIG:
            raise ReportError(
                f"--out {files.show(path)} is a run's workdir, not a report folder: name a new "
                "or empty folder (a run's own report: give its workdir without --out)"
            )
    try:
        return workdir_lib.Workdir.claim(path, OUT_CONFIG, overwrite=False)
    except workdir_lib.WorkdirError as e:
        raise ReportError(f"--out: {e}") from None


@contextlib.contextmanager
def open_writer(workdir: str):
    """The run's own Workdir, listing the files the report writes there (a FolderWriter for
    an older run's folder, which has no marker)."""
    if not os.path.exists(os.path.join(workdir, workdir_lib.MARKER)):
        yield FolderWriter(workdir)
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
    parser.add_argument(
        "--latex", action="store_true", help="also results.tex: booktabs tables, mean ± CI95"
    )
    args = parser.parse_args(argv)
    try:
        if args.window is not None and args.window < 1:
            raise ReportError(f"--window must be 1 or more, got {args.window}")
        paths = [os.path.abspath(os.path.expanduser(p)) for p in args.workdirs]
        out = args.out and os.path.abspath(os.path.expanduser(args.out))
        if out and len(paths) == 1 and out == paths[0]:
            out = None  # the run's own folder
        names = unique_names(paths)
        runs = [read_checked(p, args.window, n) for p, n in zip(paths, names)]
        if out:
            with claim_out(out) as folder:
                for run in runs:
                    writer = Prefixed(folder, run.name) if len(runs) > 1 else folder
                    dest = os.path.join(out, run.name) if len(runs) > 1 else out
                    print(f"{dest}: {', '.join(write_run(run, writer, args.latex))}")
                if len(runs) > 1:
                    print(f"{out}: {', '.join(write_combined(runs, folder))}")
            return 0
        for path, run in zip(paths, runs):
            with open_writer(path) as writer:
                print(f"{path}: {', '.join(write_run(run, writer, args.latex))}")
        if len(runs) > 1:
            print("side by side in one table and figure: add --out=FOLDER")
    except (ReportError, files.WorkdirError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # each file is written whole (atomically), old or new
        print("error: interrupted: the files written so far are whole", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    signals.terminate_as_interrupt()
    sys.exit(main())
