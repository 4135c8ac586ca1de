"""The attack x defense matrix on tiny synthetic data: one run, its files, its numbers."""

import csv
import json
import math
import os

import numpy as np
import pytest
from test_simulation import tiny_config

from fedjax_poison import compare_defenses, files
from fedjax_poison.config import configuration
from fedjax_poison.runner import workdir as workdir_lib


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    """2 attacks (+ 'none') x fedavg, median (+ bulyan, which k = 3 cannot run) x 2 seeds.

    A Gaussian update of std 1e12 passes the server guard (its norm is finite) and
    overflows the model the rounds after it is averaged in.
    """
    workdir = tmp_path_factory.mktemp("matrix")
    c = tiny_config(num_rounds=4, eval_every=2, eval_window=2)  # cells: mean of rounds 2, 4
    c.attack.malicious_fraction, c.attack.gaussian.std = 0.25, 1e12
    compare_defenses.compare(
        c, str(workdir), ["label_flip", "gaussian"], ["fedavg", "median", "bulyan"], [0, 1]
    )
    summary = json.load(open(workdir / "run" / "summary.json"))
    rows = list(csv.DictReader(open(workdir / "matrix.csv")))
    return workdir, summary, {(r["attack"], r["defense"]): r for r in rows}


def final_row(summary, attack, defense, seed):
    (row,) = [
        r
        for r in summary["final"]
        if (r["attack"], r["defense"], r["seed"]) == (attack, defense, seed)
    ]
    return row


@pytest.mark.slow  # the matrix fixture: one sweep, a minute or more
def test_one_run_with_every_cell_and_the_no_attack_row(matrix):
    workdir, summary, cells = matrix
    assert summary["num_experiments"] == 3 * 2 * 2  # attacks incl. none x defenses x seeds
    assert set(cells) == {
        (a, d) for a in ("none", "label_flip", "gaussian") for d in ("fedavg", "median", "bulyan")
    }
    for name in ("matrix.csv", "matrix.md", "matrix.png", "matrix.pdf"):
        assert (workdir / name).stat().st_size > 0
    md = open(workdir / "matrix.md").read()
    assert "25% malicious" in md and "4 rounds" in md and "seeds 0, 1" in md
    assert "the mean of the last 2 evaluations (rounds 2 to 4)" in md
    assert "| attack \\ defense | fedavg | median |" in md  # bulyan is not a column
    none = cells["none", "fedavg"]
    assert none["measure"] == "none" and none["success_mean"] == ""
    assert float(none["accuracy_drop_mean"]) == 0.0


def stable(workdir, attack, defense, seed, metric):
    """The mean of an experiment's two evaluations (W = 2), from metrics.jsonl."""
    rows = [json.loads(line) for line in open(workdir / "run" / "metrics.jsonl")]
    mine = [r for r in rows if (r["attack"], r["defense"], r["seed"]) == (attack, defense, seed)]
    assert [r["round"] for r in mine] == [2, 4]
    return float(np.mean([r[metric] for r in mine]))


@pytest.mark.slow  # the matrix fixture: one sweep, a minute or more
def test_mean_and_std_over_seeds_by_hand(matrix):
    workdir, summary, cells = matrix
    acc = [stable(workdir, "label_flip", "median", s, "accuracy") for s in (0, 1)]
    clean = [stable(workdir, "none", "median", s, "accuracy") for s in (0, 1)]
    asr = [stable(workdir, "label_flip", "median", s, "attack_success_rate") for s in (0, 1)]
    cell = cells["label_flip", "median"]
    assert cell["n"] == "2" and cell["diverged"] == "0" and cell["measure"] == "flip"
    assert float(cell["accuracy_mean"]) == pytest.approx((acc[0] + acc[1]) / 2, abs=1e-4)
    assert float(cell["accuracy_std"]) == pytest.approx(abs(acc[0] - acc[1]) / 2**0.5, abs=1e-4)
    drop = [clean[0] - acc[0], clean[1] - acc[1]]  # paired by seed
    assert float(cell["accuracy_drop_mean"]) == pytest.approx(np.mean(drop), abs=1e-4)
    assert float(cell["success_mean"]) == pytest.approx(np.mean(asr), abs=1e-4)
    text = f"{np.mean(acc):.3f} ± {np.std(acc, ddof=1):.3f} / {np.mean(asr):.3f} ± "
    assert text in open(workdir / "matrix.md").read()
    final = [final_row(summary, "label_flip", "median", s)["accuracy"] for s in (0, 1)]
    assert final != acc  # the cells are not the last evaluation's values


@pytest.mark.slow  # the matrix fixture: one sweep, a minute or more
def test_a_diverged_cell_says_so_without_a_number(matrix):
    workdir, summary, cells = matrix
    assert all(final_row(summary, "gaussian", "fedavg", s)["diverged"] for s in (0, 1))
    cell = cells["gaussian", "fedavg"]
    assert cell["diverged"] == "2" and cell["accuracy_mean"] == "" and cell["success_mean"] == ""
    lines = open(workdir / "matrix.md").read().splitlines()
    line = next(x for x in lines if x.startswith("| gaussian |"))  # the first table
    assert line.split("|")[2].strip() == "diverged"
    assert cells["label_flip", "fedavg"]["diverged"] == "0"


@pytest.mark.slow  # the matrix fixture: one sweep, a minute or more
def test_a_defense_that_cannot_run_is_a_note(matrix):
    workdir, _, cells = matrix
    note = cells["label_flip", "bulyan"]["note"]
    assert note.startswith("not run: defense.bulyan.num_byzantine") and "k=3" in note
    assert "- bulyan: not run: defense.bulyan.num_byzantine" in open(workdir / "matrix.md").read()
    assert math.isnan(float(cells["label_flip", "bulyan"]["accuracy_mean"] or "nan"))


def test_one_attack_is_one_row_and_the_old_usage_plans_it():
    c = tiny_config()
    run, notes = compare_defenses.plan(c, [c.attack.name], ["fedavg", "bulyan"], [c.seed])
    assert run.sweep.attack == ("none", "label_flip") and run.sweep.defense == ("fedavg",)
    assert run.sweep.seed == (0,) and run.sweep.mode == "product" and list(notes) == ["bulyan"]


def test_plan_refuses_other_sweeps_and_no_runnable_defense():
    c = tiny_config()
    c.sweep.malicious_fraction = (0.1, 0.2)
    with pytest.raises(configuration.ConfigError, match="sweep.malicious_fraction is set"):
        compare_defenses.plan(c, ["sign_flip"], ["fedavg"], [0])
    with pytest.raises(configuration.ConfigError, match="no defense can run"):
        compare_defenses.plan(tiny_config(), ["sign_flip"], ["bulyan"], [0])
    with pytest.raises(configuration.ConfigError, match="did you mean 'sign_flip'"):
        compare_defenses.plan(tiny_config(), ["sign_flp"], ["fedavg"], [0])
    with pytest.raises(configuration.ConfigError, match="--defenses: .*did you mean 'median'"):
        compare_defenses.plan(tiny_config(), ["sign_flip"], ["fedavg", "medain"], [0])


def test_all_names_every_attack_and_every_rule():
    every = compare_defenses.choose
    attacks = every(["all"], ["label_flip"], "attacks", compare_defenses.EVERY_ATTACK)
    rules = every(["all"], ["fedavg"], "defenses", compare_defenses.EVERY_RULE)
    assert len(attacks) >= 22 and "none" not in attacks and {"chameleon", "alie"} <= set(attacks)
    assert len(rules) >= 31 and {"fedavg", "pca", "crfl"} <= set(rules)
    run, notes = compare_defenses.plan(tiny_config(), attacks, rules, [0])
    assert run.sweep.attack == ("none", *attacks)
    assert set(run.sweep.defense) | set(notes) == set(rules)  # each runs or says why not
    with pytest.raises(configuration.ConfigError, match="names an empty value: give names .*'all'"):
        every([""], ["fedavg"], "defenses", compare_defenses.EVERY_RULE)
    assert every(["all"], ["0"], "seeds") == ["all"]  # no 'all' where there is no list of all


NEWEST_RULES = ["fldetector", "flare", "deepsight", "rflbat", "lasa", "crfl"]


@pytest.mark.slow  # one sweep of six rules
def test_the_newest_rules_run_in_the_matrix(tmp_path):
    """FLDetector, FLARE, DeepSight, RFLBAT, LASA and CRFL, with their defaults, in one
    matrix run of the tiny config: every cell has its numbers and no note."""
    c = tiny_config(num_rounds=4, eval_every=2, eval_window=2)
    c.attack.malicious_fraction = 0.25
    compare_defenses.compare(c, str(tmp_path), ["label_flip"], NEWEST_RULES, [0])
    rows = list(csv.DictReader(open(tmp_path / "matrix.csv")))
    assert {r["defense"] for r in rows} == set(NEWEST_RULES)
    for row in rows:
        assert row["note"] == "" and row["diverged"] == "0", row
        assert 0 < float(row["accuracy_mean"]) <= 1


def test_the_matrix_folder_holding_a_users_file_or_a_run_is_refused(tmp_path):
    """compare writes only into a new or empty folder, or one it wrote before: a folder
    with a user's file (even one named matrix.csv) or a run's workdir is refused in one line,
    before anything runs, and left as it is."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "matrix.csv").write_text("my own numbers\n")
    with pytest.raises(files.WorkdirError, match="holds matrix.csv but no .*nothing was deleted"):
        compare_defenses.compare(tiny_config(), str(mine), ["sign_flip"], ["fedavg"], [0])
    assert os.listdir(mine) == ["matrix.csv"]
    assert (mine / "matrix.csv").read_text() == "my own numbers\n"
    run = tmp_path / "run"
    workdir_lib.Workdir.claim(str(run), {"lr": 0.1}, overwrite=False).release()
    before = sorted(os.listdir(run))
    with pytest.raises(files.WorkdirError, match="is a run's workdir, not a matrix folder"):
        compare_defenses.compare(tiny_config(), str(run), ["sign_flip"], ["fedavg"], [0])
    assert sorted(os.listdir(run)) == before


@pytest.mark.slow  # the matrix fixture: one sweep, a minute or more
def test_the_matrix_folder_is_the_commands_own_and_takes_it_again(matrix):
    """The folder is marked as the command's: the same matrix again writes into it (its
    finished run only rewrites its tables); the user's file beside them stays."""
    folder, _, _ = matrix
    marker = json.load(open(folder / workdir_lib.MARKER))
    assert marker["config"] == compare_defenses.MATRIX_CONFIG
    assert {"matrix.csv", "matrix.md", "matrix.png"} <= set(marker["paths"])
    (folder / "notes.txt").write_text("mine")
    before = (folder / "matrix.csv").read_bytes()
    c = tiny_config(num_rounds=4, eval_every=2, eval_window=2)
    c.attack.malicious_fraction, c.attack.gaussian.std = 0.25, 1e12
    compare_defenses.compare(
        c, str(folder), ["label_flip", "gaussian"], ["fedavg", "median", "bulyan"], [0, 1]
    )
    assert (folder / "matrix.csv").read_bytes() == before
    assert (folder / "notes.txt").read_text() == "mine"
