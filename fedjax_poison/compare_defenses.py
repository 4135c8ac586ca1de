"""One table of every defense on one attack: accuracy, source recall, detection, cost.

    python -m fedjax_poison.compare_defenses --config=configs/fashion_mnist.py \
        --workdir=runs/defenses --config.attack.malicious_fraction=0.3 --config.num_rounds=30

Runs the config once per defense (`--defenses`, default all) in `workdir/<name>`, then
writes `defenses.csv` and `defenses.md`: final accuracy, source-class recall, detection
precision/recall where the rule flags clients, and seconds per round relative to FedAvg.
A defense that cannot run with the config (e.g. Bulyan with too few clients per round)
gets a row saying why.
"""

import copy
import os

from absl import app, flags, logging
from ml_collections import config_flags

from fedjax_poison import configuration, defenses, report, train

COLUMNS = (
    "defense",
    "accuracy",
    "source_recall",
    "detection_precision",
    "detection_recall",
    "time_vs_fedavg",
    "note",
)


def compare(config, workdir: str, names) -> list[dict]:
    """Runs each defense and returns one row per defense (fedavg first, as the baseline)."""
    names = ["fedavg"] + [n for n in names if n != "fedavg"]
    rows, baseline = [], None
    for name in names:
        c = copy.deepcopy(config)
        c.defense.name = name
        try:
            summary = train.train_and_evaluate(c, os.path.join(workdir, name))
        except configuration.ConfigError as e:
            rows.append({"defense": name, "note": f"not run: {e}"})
            continue
        final = summary["final"][0]
        per_round = summary["train_and_eval_s"] / c.num_rounds
        baseline = baseline or per_round
        rows.append(
            {
                "defense": name,
                "accuracy": final["accuracy"],
                "source_recall": final["source_recall"],
                "detection_precision": summary.get("detection_precision"),
                "detection_recall": summary.get("detection_recall"),
                "time_vs_fedavg": per_round / baseline,
                "note": "",
            }
        )
        logging.info("%s: %s", name, rows[-1])
    return rows


def _cell(value) -> str:
    if value is None:
        return ""
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def write_tables(workdir: str, rows: list[dict]) -> None:
    csv = [",".join(COLUMNS)] + [
        ",".join(_cell(r.get(k)).replace(",", ";") for k in COLUMNS) for r in rows
    ]
    report.write_text(os.path.join(workdir, "defenses.csv"), "\n".join(csv) + "\n")
    md = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)] + [
        "| " + " | ".join(_cell(r.get(k)) for k in COLUMNS) + " |" for r in rows
    ]
    report.write_text(os.path.join(workdir, "defenses.md"), "\n".join(md) + "\n")


def _cli() -> None:
    """Command line (flags are defined only when this module is the program)."""
    config = config_flags.DEFINE_config_file("config", None, "Config file (a get_config).")
    workdir = flags.DEFINE_string("workdir", None, "Where the runs and the table go.")
    names = flags.DEFINE_list("defenses", list(defenses.DEFENSES), "Defense names to compare.")
    flags.mark_flags_as_required(["config", "workdir"])

    def main(argv):
        del argv
        logging.set_verbosity(logging.INFO)
        rows = compare(config.value, workdir.value, names.value)
        write_tables(workdir.value, rows)
        print(open(os.path.join(workdir.value, "defenses.md")).read())

    app.run(main)


if __name__ == "__main__":
    _cli()
