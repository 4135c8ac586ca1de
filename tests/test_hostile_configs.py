"""Hostile flags and inputs to the commands beside launch.py: each is one line on stderr
and exit status 2, never a traceback, and nothing is written."""

import os
import subprocess
import sys

import pytest
from test_cli import REPO, SMOKE, env, launch

from fedjax_poison.runner.workdir import Workdir


def command(module: str, *args: str):
    return subprocess.run(
        [sys.executable, "-m", f"fedjax_poison.{module}", *args],
        cwd=REPO,
        env=env(),
        capture_output=True,
        text=True,
        timeout=300,
    )


def one_line(proc) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


def run_without_features(path) -> str:
    Workdir.claim(str(path), {"save_features": False}, overwrite=False).release()
    return str(path)


def foreign(path) -> str:
    path.mkdir()
    (path / "notes.txt").write_text("mine")
    return str(path)


@pytest.mark.parametrize(
    "rounds, workdir, expected",
    [
        ("abc", run_without_features, "--rounds=abc is not a window"),
        ("9:2", run_without_features, "--rounds=9:2 is not a window"),
        ("11:200", run_without_features, "no features in"),
        ("11:200", foreign, "holds no run"),
    ],
    ids=["rounds_abc", "rounds_backwards", "no_features", "foreign_workdir"],
)
@pytest.mark.slow  # the quick tier leaves launches and large compiles out
def test_hostile_configs_pca_analysis(tmp_path, rounds, workdir, expected):
    path = workdir(tmp_path / "run")
    before = sorted(os.listdir(path))
    line = one_line(command("pca_analysis", f"--workdir={path}", f"--rounds={rounds}"))
    assert expected in line
    assert sorted(os.listdir(path)) == before


@pytest.mark.parametrize(
    "flag, expected",
    [
        ("--seeds=a", "--seeds=a holds a value that is not a whole number"),
        ("--seeds=0,1,0", "--seeds names 0 more than once"),
        ("--attacks=", "--attacks= names an empty value"),
        ("--attacks=sign_flip,alie,sign_flip", "--attacks names sign_flip more than once"),
        ("--defenses=median,median", "--defenses names median more than once"),
    ],
    ids=["seeds_a", "seeds_repeated", "attacks_empty", "attacks_repeated", "defenses_repeated"],
)
@pytest.mark.slow  # five launches of the command: a minute on 2 cores
def test_hostile_configs_compare_defenses(tmp_path, flag, expected):
    workdir = tmp_path / "matrix"
    proc = command("compare_defenses", SMOKE, f"--workdir={workdir}", flag)
    assert expected in one_line(proc)
    assert not workdir.exists()


# --- configs that cannot act as named: refused in one line before anything is loaded ---


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ("--config.defense.name=pca", "--config.defense.pca.start_round=50"),
            "defense.pca.start_round must be <= num_rounds",
        ),
        (
            ("--config.defense.name=nnm+pca", "--config.defense.pca.start_round=7"),
            "the rule would never act",
        ),
        (
            ("--config.attack.malicious_fraction=0.99",),
            "makes all 10 malicious",
        ),
        (
            ("--config.sweep.malicious_fraction=(0.3,0.97)",),
            "makes all of them malicious",
        ),
    ],
)
@pytest.mark.slow  # the quick tier leaves launches and large compiles out
def test_hostile_configs_that_cannot_act_as_named_are_refused(tmp_path, overrides, message):
    proc = launch(SMOKE, f"--workdir={tmp_path / 'run'}", *overrides)
    assert message in one_line(proc)
    assert not (tmp_path / "run").exists()
