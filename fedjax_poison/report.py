"""Rebuilds the tables and figures of runs from their workdirs alone, and several runs side
by side:

    python -m fedjax_poison.report WORKDIR [WORKDIR ...] [--out=DIR] [--window=W] [--latex]

writes into each workdir (the run's own files) or into --out; see results/report.py for
what is read and written. --latex adds results.tex (results/latex.py): booktabs tables of
the same numbers, mean ± CI95, for a paper.
"""

import argparse
import contextlib
import os
import sys
from collections.abc import Sequence

from fedjax_poison.results.report import (
    FolderWriter,
    ReportError,
    read_run,
    write_combined,
    write_run,
)
from fedjax_poison.runner import workdir as workdir_lib


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
    parser.add_argument(
        "--latex", action="store_true", help="also results.tex: booktabs tables, mean ± CI95"
    )
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
                print(f"{dest}: {', '.join(write_run(run, writer, args.latex))}")
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
