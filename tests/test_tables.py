"""The sweep report on hand-made metrics rows: numbers checked by hand, files and plots."""

import csv
import math
import os

import pytest

from fedjax_poison import attacks, configuration, experiments, tables


def experiment(fraction, seed, schedule="always", flips="6:0", alpha=(0.5, 0.5), swept=None):
    values = dict(malicious_fraction=fraction, flips=flips, seed=seed, schedule=schedule)
    values["alpha"] = alpha
    return experiments.Experiment(
        axes={k: values[k] for k in swept or ("malicious_fraction", "seed")},
        malicious_fraction=fraction,
        flips=attacks.parse_flips(flips),
        seed=seed,
        schedule=schedule,
        alpha=alpha,
        breakpoint=75,
    )


def recall_with(source_recall, others=0.8, target=0.9):
    """[C=10] recall: 6 is the source, 0 the target, the other 8 classes `others`."""
    recall = [others] * 10
    recall[6], recall[0] = source_recall, target
    return recall


def row(e, round_, source_recall, accuracy=0.7, others=0.8):
    return {
        "round": round_,
        "experiment": e,
        "accuracy": accuracy,
        "recall": recall_with(source_recall, others),
        "source_recall": source_recall,
        "target_precision": 0.6,
        "attack_success_rate": 1 - source_recall,
    }


# Two seeds, clean and attacked. The clean source recall is 0.8 then 0.9 (seed 0) and
# 0.7 then 0.9 (seed 1); attacked 0.5 then 0.6 (seed 0) and 0.4 then 0.5 (seed 1).
EXPS = [experiment(0.0, 0), experiment(0.0, 1), experiment(0.5, 0), experiment(0.5, 1)]
ROWS = [
    row(0, 5, 0.8),
    row(0, 10, 0.9),
    row(1, 5, 0.7),
    row(1, 10, 0.9),
    row(2, 5, 0.5, others=0.7),
    row(2, 10, 0.6, accuracy=0.5, others=0.7),
    row(3, 5, 0.4, others=0.6),
    row(3, 10, 0.5, accuracy=0.6, others=0.6),
]


def config():
    c = configuration.paper_config("fashion_mnist")
    c.num_rounds = 10
    return c


def test_source_recall_loss_is_the_largest_gap_to_the_clean_twin():
    table = tables.experiment_table(ROWS, EXPS)
    # seed 0: max(0.8 - 0.5, 0.9 - 0.6) = 0.3; seed 1: max(0.7 - 0.4, 0.9 - 0.5) = 0.4
    assert table[2]["source_recall_loss"] == pytest.approx(0.3)
    assert table[3]["source_recall_loss"] == pytest.approx(0.4)
    assert table[0]["source_recall_loss"] == 0.0  # its own twin
    assert table[3]["source_recall"] == 0.5 and table[3]["accuracy"] == 0.6  # final round


def test_clean_twin_must_match_every_other_setting():
    exps = [experiment(0.0, 0), experiment(0.5, 1), experiment(0.5, 0, flips="1:3")]
    assert tables.clean_twin(exps, 1) is None  # other seed
    assert tables.clean_twin(exps, 2) is None  # other flip
    table = tables.experiment_table([row(e, 10, 0.5) for e in range(3)], exps)
    assert math.isnan(table[1]["source_recall_loss"])


def test_other_accuracy_leaves_out_sources_and_targets():
    recall = [0.0, 1.0, 0.2, 0.6, 0.4, 0.0, 0.0, 0.0, 0.0, 0.0]
    # flips 6:0 and 1:3 touch classes 0, 1, 3, 6; the other six sum to 0.6.
    assert tables.other_accuracy(recall, ((6, 0), (1, 3))) == pytest.approx(0.1)
    assert tables.experiment_table(ROWS, EXPS)[3]["other_accuracy"] == pytest.approx(0.6)


def test_mean_and_sample_std_over_two_seeds():
    table = tables.experiment_table(ROWS, EXPS)
    by_seed = tables.aggregate_over_seeds(table, ["malicious_fraction", "schedule"])
    attacked = by_seed[1]
    assert attacked["malicious_fraction"] == 0.5 and attacked["seeds"] == 2
    assert attacked["source_recall_loss_mean"] == pytest.approx(0.35)
    assert attacked["source_recall_loss_std"] == pytest.approx(math.sqrt(2 * 0.05**2))
    assert attacked["accuracy_mean"] == pytest.approx(0.55)


def test_columns_follow_the_swept_axes():
    assert tables.axis_columns(EXPS) == ["malicious_fraction", "seed", "schedule"]
    timing = [experiment(0.5, 0, s, swept=("schedule",)) for s in ("always", "early")]
    assert tables.axis_columns(timing) == ["schedule", "breakpoint"]
    avail = [experiment(0.5, 0, "availability", alpha=(0.0, 0.6), swept=("alpha",))]
    assert tables.axis_columns(avail) == ["schedule", "alpha", "breakpoint"]
    assert tables.axis_values(avail[0])["alpha"] == "0/0.6"


def test_report_files_and_plots(tmp_path):
    tables.write_sweep_report(str(tmp_path), ROWS, EXPS, config())
    for name in ("results.csv", "results_by_seed.csv", "results.md"):
        assert os.path.getsize(tmp_path / name) > 0, name
    assert os.path.getsize(tmp_path / "source_recall_vs_fraction.png") > 0
    assert not os.path.exists(tmp_path / "recall_over_rounds.png")  # no schedule swept
    per_exp = list(csv.DictReader(open(tmp_path / "results.csv")))
    assert [r["experiment"] for r in per_exp] == ["0", "1", "2", "3"]
    assert float(per_exp[2]["source_recall_loss"]) == pytest.approx(0.3)
    by_seed = list(csv.DictReader(open(tmp_path / "results_by_seed.csv")))
    assert float(by_seed[1]["source_recall_loss_mean"]) == pytest.approx(0.35)
    markdown = open(tmp_path / "results.md").read()
    assert "0.350 ± 0.071" in markdown and "Mean ± std over seeds" in markdown


def test_no_clean_twin_is_an_empty_cell_and_schedules_are_plotted(tmp_path):
    exps = [
        experiment(0.5, s, name, swept=("schedule", "seed"))
        for name in ("early", "late")
        for s in (0, 1)
    ]
    rows = [row(e, r, 0.5) for e in range(4) for r in (5, 10)]
    tables.write_sweep_report(str(tmp_path), rows, exps, config())
    per_exp = list(csv.DictReader(open(tmp_path / "results.csv")))
    assert per_exp[0]["source_recall_loss"] == "" and per_exp[0]["schedule"] == "early"
    assert os.path.getsize(tmp_path / "recall_over_rounds.png") > 0
    assert not os.path.exists(tmp_path / "source_recall_vs_fraction.png")


def test_a_single_run_has_a_one_row_table(tmp_path):
    single = experiments.expand(config())
    rows = [{k: v for k, v in row(0, 10, 0.7).items() if k != "experiment"}]
    tables.write_sweep_report(str(tmp_path), rows, single, config())
    per_exp = list(csv.DictReader(open(tmp_path / "results.csv")))
    assert len(per_exp) == 1 and per_exp[0]["schedule"] == "always"
    assert float(per_exp[0]["source_recall"]) == 0.7
