"""The PCA defense's detection over a short run on the real files, every round counted.

    python benchmarks/pca_detection.py                  # 30 rounds, 0 / 30 / 50% attackers
    python benchmarks/pca_detection.py --start-round=10 # no flags before round 10

Fashion-MNIST as in the paper (50 clients, 5 per round, flip 6 -> 0) with
`defense.name=pca, defense.mode=detect`: the defense flags, training stays plain FedAvg.
Two runs through `train.train_and_evaluate`, each a sweep over the malicious fraction,
one with the source class known (6) and one unknown (-1), then one table: precision,
recall and false positives over all rounds, and flags per round in the first 10 rounds
and in the rest (from the cumulative detection counts of the metrics rows, evaluated every
10 rounds). 27 minutes on a shared 2-core CPU with other jobs running (two runs of 90
experiment-rounds); docs/pca_detection.md holds the result.
"""

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fedjax_poison import files  # noqa: E402
from fedjax_poison.config import configuration  # noqa: E402
from fedjax_poison.round import sharding  # noqa: E402
from fedjax_poison.runner import train  # noqa: E402

EARLY = 10  # rounds counted as the first ones (the paper's code starts its window here)


def detection_config(args, source_class: int):
    """The paper's Fashion-MNIST setup with the PCA defense in detect mode, three fractions."""
    c = configuration.paper_config("fashion_mnist")
    c.data.source = args.data_source
    c.num_rounds = args.rounds
    c.eval_every = EARLY
    c.sweep.malicious_fraction = tuple(args.fractions)
    c.defense.name = "pca"
    c.defense.mode = "detect"
    c.defense.pca.source_class = source_class
    c.defense.pca.start_round = args.start_round
    return c


def table_rows(rows: list[dict], source_class: int, num_rounds: int) -> list[dict]:
    """One row per malicious fraction from a run's metrics rows (cumulative counts)."""
    out = []
    for fraction in sorted({r["malicious_fraction"] for r in rows}):
        mine = {r["round"]: r["detection"] for r in rows if r["malicious_fraction"] == fraction}
        end, early = mine[num_rounds], mine[EARLY]
        flagged = end["tp"] + end["fp"]
        early_flags = early["tp"] + early["fp"]
        out.append(
            {
                "malicious": f"{fraction:.0%}",
                "source": "known (6)" if source_class >= 0 else "unknown (-1)",
                "precision": f"{end['tp'] / flagged:.2f}" if flagged else "-",
                "recall": f"{end['tp'] / (end['tp'] + end['fn']):.2f}" if fraction else "-",
                "false positives": str(end["fp"]),
                "missed": str(end["fn"]),
                f"flags/round, rounds 0-{EARLY - 1}": f"{early_flags / EARLY:.1f}",
                f"flags/round, rounds {EARLY}-{num_rounds - 1}": (
                    f"{(flagged - early_flags) / (num_rounds - EARLY):.1f}"
                ),
                "attackers/round": f"{(end['tp'] + end['fn']) / num_rounds:.1f}",
            }
        )
    return out


def markdown(rows: list[dict]) -> str:
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(r[k] for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=30, help="a multiple of 10, at least 20")
    p.add_argument("--fractions", type=float, nargs="+", default=[0.0, 0.3, 0.5])
    p.add_argument("--start-round", type=int, default=1, help="defense.pca.start_round (from 1)")
    p.add_argument("--data-source", default="files", help="data.source: files, tfds, ...")
    p.add_argument("--workdir", default="", help="where the runs write (default: a temp dir)")
    args = p.parse_args(argv)
    if args.rounds % EARLY or args.rounds <= EARLY:
        p.error(f"--rounds must be a multiple of {EARLY} above {EARLY}, got {args.rounds}")
    sharding.use_cpu_devices(0)  # as launch.py: one CPU device per core
    root = args.workdir or tempfile.mkdtemp(prefix="pca_detection_")
    table = []
    for source_class in (6, -1):
        workdir = os.path.join(root, f"source_{source_class}")
        train.train_and_evaluate(detection_config(args, source_class), workdir)
        rows = files.read_lines(os.path.join(workdir, "metrics.jsonl"))
        table += table_rows(rows, source_class, args.rounds)
    print(f"{args.rounds} rounds, defense.pca.start_round={args.start_round}, runs in {root}")
    print(markdown(sorted(table, key=lambda r: (r["malicious"], r["source"]))))


if __name__ == "__main__":
    main()
