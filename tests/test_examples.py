"""The examples of a user's own attack, defense, model and dataset: each registers from its
own module, passes its family's contract, and runs in a sweep; the config file that brings
them runs through launch.py and the attack x defense matrix."""

import importlib
import json
import os
import subprocess
import sys

import pytest

from fedjax_poison import testing

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow  # each runs a sweep: 1-2 minutes on 2 cores


@pytest.fixture
def example():
    """Imports an example module with its registrations undone afterwards."""
    with testing.registrations_undone():
        yield lambda name: importlib.reload(importlib.import_module(f"examples.{name}"))


def test_a_users_attack_hurts_fedavg_more_than_the_median(example, tmp_path):
    accuracy = example("custom_attack").main(str(tmp_path / "run"))
    clean = accuracy[("fedavg", 0.0)]
    assert clean > 0.6
    assert accuracy[("fedavg", 0.3)] < clean - 0.3  # the reversed mean wrecks the average
    assert accuracy[("median", 0.3)] > accuracy[("fedavg", 0.3)] + 0.2


def test_a_users_defense_filters_boosted_sign_flips(example, tmp_path):
    rows = example("custom_defense").main(str(tmp_path / "run"))
    assert rows["norm_filter"]["accuracy_window"] > rows["fedavg"]["accuracy_window"] + 0.3
    assert rows["norm_filter"]["detection_precision"] == 1.0  # it flags attackers only


def test_a_users_model_learns_and_feels_the_flip(example, tmp_path):
    rows = example("custom_model").main(str(tmp_path / "run"))
    assert rows[0.0]["accuracy_window"] > 0.5
    assert rows[0.3]["source_recall_window"] < rows[0.0]["source_recall_window"]


def test_a_users_dataset_trains_above_chance(example, tmp_path):
    rows = example("custom_dataset").main(str(tmp_path / "run"))
    assert rows[0.0]["accuracy_window"] > 0.5  # 10 classes: chance is 0.1
    spec = json.loads((tmp_path / "run" / "config.json").read_text())
    assert spec["dataset"] == "digits" and spec["data"]["partition"] == "dirichlet"


def test_a_config_file_brings_its_parts_to_launch_and_the_matrix(tmp_path):
    env = {**os.environ, "PYTHONPATH": REPO}
    matrix = tmp_path / "matrix"
    command = [
        sys.executable,
        "-m",
        "fedjax_poison.compare_defenses",
        "--config=examples/plugins_config.py",
        "--attacks=reverse_mean",
        "--defenses=norm_filter,median",
        f"--workdir={matrix}",
        "--config.num_rounds=2",
        "--config.eval_every=2",
    ]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    table = (matrix / "matrix.md").read_text()
    assert "reverse_mean" in table and "norm_filter" in table
