"""A run's tables on hand-made runs: stable measures, statistics across seeds, files."""

import csv
import io
import json
import math

import pytest

from fedjax_poison.results import report, tables

CONFIG = {
    "dataset": "fashion_mnist",
    "num_clients": 50,
    "clients_per_round": 5,
    "num_rounds": 20,
    "eval_every": 5,
    "data": {"source": "auto"},
}


def exp(e, fraction, seed, twin=None, flips="6:0", attack="label_flip"):
    """A normalized experiment (as report.read_experiments gives them)."""
    return {
        "experiment": e,
        "label": f"malicious_fraction={fraction} seed={seed}",
        "attack": attack,
        "defense": "fedavg",
        "malicious_fraction": fraction,
        "flips": flips,
        "seed": seed,
        "schedule": "always",
        "alpha": [0.5, 0.5],
        "breakpoint": 75,
        "measure": "none" if attack == "none" or fraction == 0 else "flip",
        "clean_twin": twin,
    }


def row(e, round_, source, accuracy=0.8, **extra):
    """A metrics row; class 6 is the source, 0 the target, the others recall 0.9."""
    recall = [0.9] * 10
    recall[6], recall[0] = source, 0.7
    base = {"round": round_, "experiment": e, "accuracy": accuracy, "recall": recall}
    base.update(source_recall=source, attack_success_rate=1 - source, target_precision=0.6)
    return {**base, **extra}


def run_of(exps, rows, window=2, source="synthetic"):
    per_exp = [[r for r in rows if r["experiment"] == e] for e in range(len(exps))]
    return tables.Run("lf", CONFIG, exps, per_exp, source, window, {})


# Clean (0, 1) and attacked (2, 3) for seeds 0 and 1, evaluated after rounds 10, 15, 20.
EXPS = [exp(0, 0.0, 0), exp(1, 0.0, 1), exp(2, 0.5, 0, twin=0), exp(3, 0.5, 1, twin=1)]
SOURCE = {0: (0.8, 0.9, 0.9), 1: (0.8, 0.8, 0.9), 2: (0.0, 0.455, 0.0), 3: (0.5, 0.3, 0.5)}
ROWS = [row(e, r, s) for e in range(4) for r, s in zip((10, 15, 20), SOURCE[e])]


def test_stable_measures_average_the_last_evaluations_and_keep_the_final():
    table = tables.experiment_table(run_of(EXPS, ROWS, window=2))
    # The final round's 0.0 swings; the mean of the last two evaluations does not.
    assert table[2]["source_recall"] == pytest.approx((0.455 + 0.0) / 2)
    assert table[2]["source_recall_final"] == 0.0
    assert table[2]["attack_success_rate"] == pytest.approx(1 - 0.2275)
    # other classes: 8 at 0.9 (the target's 0.7 and the source left out)
    assert table[2]["other_accuracy"] == pytest.approx(0.9)


def test_source_recall_loss_is_the_mean_gap_to_the_clean_twin():
    table = tables.experiment_table(run_of(EXPS, ROWS, window=2))
    # seed 0: ((0.9 - 0.455) + (0.9 - 0.0)) / 2, not the largest gap 0.9
    assert table[2]["source_recall_loss"] == pytest.approx(0.6725)
    assert table[2]["source_recall_loss_final"] == pytest.approx(0.9)
    # seed 1: ((0.8 - 0.3) + (0.9 - 0.5)) / 2
    assert table[3]["source_recall_loss"] == pytest.approx(0.45)
    assert table[3]["source_recall_vs_clean"] == pytest.approx(-0.45)
    assert math.isnan(table[0]["source_recall_loss"])  # the clean run has no twin


def test_a_twin_without_flips_is_read_on_the_attacked_classes():
    exps = [exp(0, 0.0, 0, flips="", attack="none"), exp(1, 0.5, 0, twin=0)]
    rows = [row(0, 20, 0.85, source_recall=None, attack_success_rate=None), row(1, 20, 0.25)]
    table = tables.experiment_table(run_of(exps, rows, window=1))
    assert table[1]["source_recall_loss"] == pytest.approx(0.6)
    assert math.isnan(table[1]["attack_success_rate_vs_clean"])  # other flips: undefined


def test_statistics_over_seeds_mean_std_n_and_ci95():
    exps = [exp(e, 0.5, e) for e in range(3)]
    rows = [row(e, 20, s) for e, s in enumerate((0.2, 0.4, 0.6))]
    (group,) = tables.by_seed_table(tables.experiment_table(run_of(exps, rows, window=1)))
    assert group["seeds"] == 3 and group["source_recall_n"] == 3
    assert group["source_recall_mean"] == pytest.approx(0.4)
    assert group["source_recall_std"] == pytest.approx(0.2)
    # t(0.975, 2) = 4.3027; 4.3027 * 0.2 / sqrt(3)
    assert group["source_recall_ci95"] == pytest.approx(0.49683, abs=1e-5)


def test_paired_difference_to_the_clean_twin():
    by_seed = tables.by_seed_table(tables.experiment_table(run_of(EXPS, ROWS, window=2)))
    attacked = by_seed[1]
    assert attacked["malicious_fraction"] == "0.5" and attacked["seeds"] == 2
    # per seed: -0.6725 and -0.45; sample std 0.157331; t(0.975, 1) = 12.7062
    assert attacked["source_recall_vs_clean_mean"] == pytest.approx(-0.56125)
    assert attacked["source_recall_vs_clean_ci95"] == pytest.approx(
        12.7062 * 0.157331 / math.sqrt(2), rel=1e-4
    )
    assert attacked["source_recall_vs_clean_n"] == 2
    assert by_seed[0]["source_recall_vs_clean_n"] == 0


def test_a_diverged_experiment_has_no_numbers_and_is_left_out_of_the_means():
    exps = [exp(e, 0.5, e) for e in range(3)]
    rows = [row(e, 20, s) for e, s in enumerate((0.2, 0.4, 0.6))]
    rows[2].update(diverged=True, diverged_round=17, source_recall=None, accuracy=None)
    run = run_of(exps, rows, window=1)
    table = tables.experiment_table(run)
    assert table[2]["diverged"] == 17 and math.isnan(table[2]["accuracy"])
    (group,) = tables.by_seed_table(table)
    assert group["source_recall_mean"] == pytest.approx(0.3) and group["source_recall_n"] == 2
    assert group["diverged"] == 1
    files = _written(run)
    per_exp = list(csv.DictReader(io.StringIO(files["results.csv"])))
    assert per_exp[2]["diverged"] == "17" and per_exp[2]["accuracy"] == ""
    assert per_exp[0]["diverged"] == "" and per_exp[0]["source_recall"] == "0.2"
    assert "2 of 3 | 1 (round 17)" in files["results.md"]


class Recorder:
    """A writer that keeps what it is given."""

    def __init__(self):
        self.files = {}

    def write_text(self, name, text):
        self.files[name] = text


def _written(run):
    writer = Recorder()
    assert tables.write_tables(run, writer) == ["results.csv", "results_by_seed.csv", "results.md"]
    return writer.files


def test_csv_files_hold_the_columns_a_reader_needs():
    files = _written(run_of(EXPS, ROWS, window=2))
    per_exp = list(csv.DictReader(io.StringIO(files["results.csv"])))
    assert [r["experiment"] for r in per_exp] == ["0", "1", "2", "3"]
    assert float(per_exp[2]["source_recall"]) == pytest.approx(0.2275)
    assert per_exp[2]["source_recall_final"] == "0" and per_exp[2]["window"] == "2"
    assert per_exp[2]["clean_twin"] == "0" and per_exp[0]["clean_twin"] == ""
    by_seed = list(csv.DictReader(io.StringIO(files["results_by_seed.csv"])))
    assert float(by_seed[1]["source_recall_loss_mean"]) == pytest.approx(0.56125)
    assert by_seed[1]["source_recall_loss_n"] == "2" and by_seed[1]["seeds"] == "2"


def test_one_seed_has_no_confidence_interval():
    files = _written(run_of([exp(0, 0.5, 0)], [row(0, 20, 0.3)], window=1))
    (group,) = list(csv.DictReader(io.StringIO(files["results_by_seed.csv"])))
    assert group["source_recall_mean"] == "0.3" and group["source_recall_n"] == "1"
    assert group["source_recall_ci95"] == "" and group["source_recall_std"] == ""


def test_markdown_says_what_ran_and_gives_mean_ci_and_n():
    markdown = _written(run_of(EXPS, ROWS, window=2))["results.md"]
    assert "data source used: synthetic (config: data.source=auto)" in markdown
    assert "- attack: label_flip" in markdown and "- defense: fedavg" in markdown
    assert "6:0 (Shirt→T-shirt/top)" in markdown
    assert "50, 5 per round" in markdown and "rounds: 20, evaluated every 5" in markdown
    assert "W=2 evaluations (rounds 15 to 20)" in markdown
    # attacked source recall, seeds 0.2275 and 0.4: mean 0.314, CI 12.7062 * 0.12197 / 1.4142
    assert "| 0.5 | 2 |" in markdown and "0.314 ± 1.096" in markdown
    # beside the clean twin: this vs clean, the paired difference ± CI95, in words
    assert "0.314 vs 0.875 clean: -0.561 ± 1.414, not distinguishable from no attack" in markdown


def test_a_workdir_gets_its_tables_and_figures(tmp_path):
    # What the run loop leaves: config.json, experiments.json, metrics.jsonl.
    (tmp_path / "config.json").write_text(json.dumps(CONFIG))
    (tmp_path / "experiments.json").write_text(json.dumps(EXPS))
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    written = report.write_report(str(tmp_path))
    per_exp = list(csv.DictReader(open(tmp_path / "results.csv")))
    assert per_exp[2]["clean_twin"] == "0" and per_exp[3]["clean_twin"] == "1"
    # 20 rounds evaluated every 5: W = 1, the gap at round 20
    assert float(per_exp[2]["source_recall_loss"]) == pytest.approx(0.9 - 0.0)
    assert per_exp[2]["window"] == "1"
    for name in ("curves.png", "curves.pdf", "source_recall_vs_fraction.png"):
        assert name in written and (tmp_path / name).stat().st_size > 0, name


def test_alpha_cells_read_before_slash_after_and_stay_once_formatted():
    assert tables.format_setting("alpha", [0.0, 0.6]) == "0/0.6"
    assert tables.format_setting("alpha", 0.5) == "0.5"
    assert tables.format_setting("alpha", "0/0.6") == "0/0.6"  # figures format cells again


def test_a_clean_row_shows_the_recall_of_the_class_its_twins_attack():
    clean = [exp(0, 0.0, 0, flips="", twin=0), exp(1, 0.0, 1, flips="", twin=1)]  # as written
    table = tables.experiment_table(run_of(clean + EXPS[2:], ROWS, window=2))
    assert table[0]["source_recall"] == pytest.approx((0.9 + 0.9) / 2)  # class 6, rounds 15, 20
    assert table[0]["other_accuracy"] == pytest.approx(0.9)
    assert table[0]["source_recall_loss"] == 0.0  # its own twin, as its accuracy_drop
    other = [exp(0, 0.0, 0, flips=""), exp(1, 0.5, 0, twin=0), exp(2, 0.5, 0, twin=0, flips="1:3")]
    rows = [row(e, 20, 0.5) for e in range(3)]
    assert math.isnan(tables.experiment_table(run_of(other, rows))[0]["source_recall"])


def test_detection_is_read_from_the_counts_and_undefined_is_empty():
    counts = {"tp": 0, "fp": 0, "fn": 0, "tn": 20}  # no attacker, nobody flagged
    rows = [row(e, 20, 0.5, detection=counts, detection_precision=0.0) for e in range(2)]
    rows[1]["detection"] = {"tp": 3, "fp": 1, "fn": 2, "tn": 14}
    table = tables.experiment_table(run_of(EXPS[:2], rows))
    assert math.isnan(table[0]["detection_precision"]) and math.isnan(table[0]["detection_recall"])
    assert table[1]["detection_precision"] == 0.75 and table[1]["detection_recall"] == 0.6
