"""A sweep axis is one entry of sweeps.AXES: one added here (a setting that changes nothing
in the round, but is a distinct experiment) reaches the experiments, experiments.json, every
table and the figures' titles and legends, and older runs without it still read back."""

import csv
import io
import json
import types

import numpy as np
import pytest

from fedjax_poison.config import configuration, experiments, sweeps
from fedjax_poison.config import plan as plan_lib
from fedjax_poison.results import figures, report, tables
from fedjax_poison.runner import writer

DUMMY = sweeps.Axis(
    check=lambda value, c: None,
    convert=int,
    default=lambda c: 0,
    matters=lambda exp: True,
    inert="",
)


@pytest.fixture(autouse=True)
def dummy_axis(monkeypatch):
    """sweeps.AXES with one more entry, 'dummy', for the test."""
    monkeypatch.setitem(sweeps.AXES, "dummy", DUMMY)


def config(dummies=(1, 2), seeds=(0, 1)):
    """Fashion-MNIST, half the clients flipping 6 -> 0, `dummy` and the seed swept."""
    c = configuration.paper_config("fashion_mnist")  # its sweep block lists every axis
    c.attack.malicious_fraction, c.attack.flips = 0.5, "6:0"
    c.sweep.dummy, c.sweep.seed = tuple(dummies), tuple(seeds)
    return c


def describe(plan):
    """experiments.json of a plan, for attackers drawn as nobody (nothing here reads them)."""
    programs = types.SimpleNamespace(
        scenarios=types.SimpleNamespace(malicious=np.zeros((len(plan.experiments), 50), bool)),
        attack_of=[types.SimpleNamespace(measure="flip", target=0)] * len(plan.experiments),
    )
    return writer.describe(plan, programs)


def metrics_rows(entries):
    """Rounds 1..4 of each experiment; its source recall 0.1 * (dummy + seed)."""
    rows = []
    for e, entry in enumerate(entries):
        source = 0.1 * (entry.get("dummy", 0) + entry["seed"])
        recall = [0.9] * 10
        recall[6] = source
        rows += [
            {"round": r, "experiment": e, "accuracy": 0.8, "recall": recall,
             "source_recall": source, "attack_success_rate": 1 - source}
            for r in range(1, 5)
        ]  # fmt: skip
    return rows


def workdir_run(tmp_path, entries, c):
    """The Run read back from a workdir holding these experiments.json entries."""
    (tmp_path / "config.json").write_text(json.dumps(c.to_dict()))
    (tmp_path / "experiments.json").write_text(json.dumps(entries))
    lines = "".join(json.dumps(r) + "\n" for r in metrics_rows(entries))
    (tmp_path / "metrics.jsonl").write_text(lines)
    return report.read_run(str(tmp_path), window=2, name="dummy_run")


class Recorder:
    """A writer that keeps what it is given."""

    def __init__(self):
        self.files = {}

    def write_text(self, name, text):
        self.files[name] = text


def written_tables(run):
    recorder = Recorder()
    tables.write_tables(run, recorder)
    return recorder.files


def test_an_added_axis_makes_distinct_experiments_and_is_in_experiments_json():
    plan = plan_lib.build(config())
    # the seed comes first in AXES: the outer loop
    assert [(e.seed, e.dummy) for e in plan.experiments] == [(0, 1), (0, 2), (1, 1), (1, 2)]
    assert experiments.label(plan.experiments[1]) == "seed=0 dummy=2"
    entries = describe(plan)
    assert [x["dummy"] for x in entries] == [1, 2, 1, 2]
    assert entries[1]["axes"] == {"seed": 0, "dummy": 2}


def synthetic_run(dummies=(1, 2), seeds=(0, 1)):
    """A run of label flipping with `dummy` and the seed swept, as report.read_run gives it."""
    entries = [
        {"axes": {"dummy": d, "seed": s}, "dummy": d, "seed": s} for d in dummies for s in seeds
    ]
    rows = metrics_rows(entries)
    per_exp = [[r for r in rows if r["experiment"] == e] for e in range(len(entries))]
    c = config().to_dict()
    exps = report.with_twins(entries, c, per_exp)
    return tables.Run("dummy_run", c, exps, per_exp, "synthetic", 2, {})


def test_an_added_axis_has_a_column_and_never_merges_groups():
    files = written_tables(synthetic_run())
    per_exp = list(csv.DictReader(io.StringIO(files["results.csv"])))
    assert [r["dummy"] for r in per_exp] == ["1", "1", "2", "2"]
    by_seed = list(csv.DictReader(io.StringIO(files["results_by_seed.csv"])))
    # 2 values x 2 seeds: 2 groups of 2 seeds, not one group of 4
    assert [(g.get("dummy"), g["seeds"]) for g in by_seed] == [("1", "2"), ("2", "2")]
    # seeds 0 and 1 of dummy 1: source recall 0.1 and 0.2
    assert float(by_seed[0]["source_recall_mean"]) == pytest.approx(0.15)
    markdown = files["results.md"]
    assert "- dummy: 1, 2 (swept)" in markdown
    assert "| dummy | n |" in markdown  # the table across seeds has its column


def test_an_added_axis_is_in_the_figure_legend_and_title():
    run = synthetic_run()
    table = tables.experiment_table(run)
    fig = figures.curves_figure(run, table, tables.by_seed_table(table))
    labels = [h.get_label() for h in fig.legends[0].legend_handles]
    assert "dummy 1" in labels and "dummy 2" in labels
    run = synthetic_run(dummies=(3,))  # one value: every group shares it, and the title says so
    table = tables.experiment_table(run)
    fig = figures.curves_figure(run, table, tables.by_seed_table(table))
    assert "dummy 3" in " ".join(fig.get_suptitle().split())


def test_experiments_json_reads_back_with_the_axis(tmp_path):
    c = config()
    run = workdir_run(tmp_path, describe(plan_lib.build(c)), c)
    assert [e["dummy"] for e in run.experiments] == [1, 2, 1, 2]
    by_seed = list(csv.DictReader(io.StringIO(written_tables(run)["results_by_seed.csv"])))
    assert [(g["dummy"], g["seeds"]) for g in by_seed] == [("1", "2"), ("2", "2")]


def test_an_older_run_without_the_axis_reads_back_with_its_default(tmp_path):
    c = config()
    entries = describe(plan_lib.build(config(dummies=(), seeds=(0, 1))))
    for entry in entries:
        del entry["dummy"]  # as a run from before the axis wrote it
    run = workdir_run(tmp_path, entries, c)
    assert [e["dummy"] for e in run.experiments] == [0, 0]
    per_exp = list(csv.DictReader(io.StringIO(written_tables(run)["results.csv"])))
    assert [r["dummy"] for r in per_exp] == ["0", "0"]
