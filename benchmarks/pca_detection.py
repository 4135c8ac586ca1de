"""The PCA defense's detection over short runs on the real files, every round counted,
over several seeds.

    python benchmarks/pca_detection.py --seeds 0 1 2 3 6 --workdir=runs/pca5   # 600 rounds
    python benchmarks/pca_detection.py --sources 6 -1      # also with the source unknown
    python benchmarks/pca_detection.py --tables runs/pca5  # the tables again, no training
    python benchmarks/pca_detection.py --tables runs/pca5 --replay min_separation=2

Fashion-MNIST as in the paper (50 clients, 5 per round, flip 6 -> 0) with
`defense.name=pca, defense.mode=detect`: the defense flags, training stays plain FedAvg.
One run through `train.train_and_evaluate` per source class (6: known, -1: unknown), each
one sweep (one compiled program) over seed x malicious fraction, with `save_features=True`:
every round's source and target rows of the selected clients and the global model's rows
are kept in `features/`, so that a variant of the rule can be replayed on them offline
(`--replay field=value ...`, the fields of `defense.pca`; the source known) without
training again. Tables: per fraction, the mean and the range over seeds of precision and
recall, and the false positives; then one row per seed and fraction. docs/pca_detection.md
holds the result and the time it took.
"""

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fedjax_poison import pca_analysis  # noqa: E402
from fedjax_poison.config import configuration  # noqa: E402
from fedjax_poison.round import sharding  # noqa: E402
from fedjax_poison.runner import train  # noqa: E402

EARLY = 10  # rounds counted as the first ones (the paper's code starts its window here)


def detection_config(args, source_class: int):
    """The paper's Fashion-MNIST setup with the PCA defense in detect mode, swept over
    seed x malicious fraction, the feature rows kept."""
    c = configuration.paper_config("fashion_mnist")
    c.data.source = args.data_source
    c.num_rounds = args.rounds
    c.eval_every = EARLY
    c.save_features = True
    c.sweep.seed = tuple(args.seeds)
    c.sweep.malicious_fraction = tuple(args.fractions)
    c.defense.name = "pca"
    c.defense.mode = "detect"
    c.defense.pca.source_class = source_class
    c.defense.pca.start_round = args.start_round
    return c


def counts(flagged: np.ndarray, malicious: np.ndarray) -> dict:
    """Detection counts of flags [R, k] against the truth [R, k], all rounds and the first."""
    early = np.arange(flagged.shape[0]) < EARLY
    tp, fp = flagged & malicious, flagged & ~malicious
    return {
        "tp": int(tp.sum()),
        "fp": int(fp.sum()),
        "fn": int((~flagged & malicious).sum()),
        "fn_early": int((~flagged & malicious)[early].sum()),
        "attackers": int(malicious.sum()),
    }


def experiment_rows(workdir: str, overrides: dict | None = None) -> list[dict]:
    """One row per experiment of a run: seed, fraction and the detection counts of the
    run's own flags, or of the rule replayed with `overrides` of its fields."""
    with open(os.path.join(workdir, "experiments.json")) as f:
        settings = {e["experiment"]: e for e in json.load(f)}
    runs = pca_analysis.load_rounds(workdir)
    order = sorted(runs)
    if overrides is None:
        flags = [runs[e]["flagged"] for e in order]
    else:
        flags = pca_analysis.replay([runs[e] for e in order], **overrides)
    out = []
    for e, flagged in zip(order, flags):
        rounds = runs[e]
        fraction = float(settings[e]["malicious_fraction"])
        row = {"seed": int(settings[e]["seed"]), "fraction": fraction}
        out.append(row | counts(np.asarray(flagged, bool), rounds["malicious"].astype(bool)))
    return out


def precision(row: dict) -> float | None:
    flagged = row["tp"] + row["fp"]
    return row["tp"] / flagged if flagged else None


def recall(row: dict) -> float | None:
    return row["tp"] / row["attackers"] if row["attackers"] else None


def spread(values: list) -> str:
    """'mean (min-max, std s)' over the seeds that have a value; '-' if none."""
    v = np.array([x for x in values if x is not None], float)
    if not v.size:
        return "-"
    return f"{v.mean():.2f} ({v.min():.2f}-{v.max():.2f}, std {v.std():.2f})"


def summary_table(rows: list[dict], source: str) -> list[dict]:
    """Per fraction: precision and recall over seeds, false positives and misses summed."""
    out = []
    for fraction in sorted({r["fraction"] for r in rows}):
        mine = [r for r in rows if r["fraction"] == fraction]
        missed = sum(r["fn"] for r in mine), sum(r["fn_early"] for r in mine)
        out.append(
            {
                "malicious": f"{fraction:.0%}",
                "source": source,
                "seeds": str(len(mine)),
                "precision": spread([precision(r) for r in mine]),
                "recall": spread([recall(r) for r in mine]),
                "lowest-recall seed": (
                    str(min(mine, key=lambda r: recall(r) or 0.0)["seed"]) if fraction else "-"
                ),
                "false positives": str(sum(r["fp"] for r in mine)),
                "missed (rounds 1-10)": f"{missed[0]} ({missed[1]})",
                "attackers": str(sum(r["attackers"] for r in mine)),
            }
        )
    return out


def seed_table(rows: list[dict], source: str) -> list[dict]:
    cell = lambda x: "-" if x is None else f"{x:.3f}"
    return [
        {
            "malicious": f"{r['fraction']:.0%}",
            "source": source,
            "seed": str(r["seed"]),
            "precision": cell(precision(r)),
            "recall": cell(recall(r)),
            "tp": str(r["tp"]),
            "fp": str(r["fp"]),
            "missed (rounds 1-10)": f"{r['fn']} ({r['fn_early']})",
        }
        for r in sorted(rows, key=lambda r: (r["fraction"], r["seed"]))
    ]


def markdown(rows: list[dict]) -> str:
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(r[k] for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def parse_overrides(items: list[str]) -> dict:
    """['min_separation=2', ...] -> {'min_separation': 2.0, ...} (JSON values, else text)."""
    out = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq:
            raise SystemExit(f"error: --replay {item!r} is not field=value")
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


def tables(root: str, sources: list[int], overrides: dict | None) -> str:
    """The summary and per-seed tables of the runs under root (replayed if overrides)."""
    summary, per_seed = [], []
    for source_class in sources:
        workdir = os.path.join(root, f"source_{source_class}")
        name = "known (6)" if source_class >= 0 else "unknown (-1)"
        if overrides is not None:
            if source_class < 0:
                continue  # the features hold the source and target rows only
            name += " replayed"
        rows = experiment_rows(workdir, overrides)
        summary += summary_table(rows, name)
        per_seed += seed_table(rows, name)
    return markdown(summary) + "\n\n" + markdown(per_seed)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=30, help="a multiple of 10, at least 20")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--fractions", type=float, nargs="+", default=[0.0, 0.1, 0.3, 0.5])
    p.add_argument("--sources", type=int, nargs="+", default=[6], help="6 known, -1 unknown")
    p.add_argument("--start-round", type=int, default=1, help="defense.pca.start_round (from 1)")
    p.add_argument("--data-source", default="files", help="data.source: files, tfds, ...")
    p.add_argument("--workdir", default="", help="where the runs write (default: a temp dir)")
    p.add_argument("--tables", default="", help="a --workdir of earlier runs: no training")
    p.add_argument("--replay", nargs="*", default=None, help="defense.pca fields: field=value")
    args = p.parse_args(argv)
    if args.rounds % EARLY or args.rounds <= EARLY:
        p.error(f"--rounds must be a multiple of {EARLY} above {EARLY}, got {args.rounds}")
    overrides = None if args.replay is None else parse_overrides(args.replay)
    root = args.tables
    if not root:
        sharding.use_cpu_devices(0)  # as launch.py: one CPU device per core
        root = args.workdir or tempfile.mkdtemp(prefix="pca_detection_")
        for source_class in args.sources:
            start = time.perf_counter()
            workdir = os.path.join(root, f"source_{source_class}")
            train.train_and_evaluate(detection_config(args, source_class), workdir)
            print(f"source {source_class}: {time.perf_counter() - start:.0f} s", flush=True)
    print(f"runs in {root}, replayed with {overrides}" if overrides is not None else root)
    print(tables(root, args.sources, overrides))


if __name__ == "__main__":
    main()
