"""Divergence: a non-finite loss or model is caught on device, in the round that made it.

A single run stops with DivergenceError (launch.py prints it in one line) after writing its
metrics up to there; in a sweep the diverged experiment's rows say so and the others go on,
unchanged.
"""

import json
import os
import sys

import jax
import jax.numpy as jnp
import pytest
from absl import flags
from test_simulation import tiny_config

import launch
from fedjax_poison.round import simulation
from fedjax_poison.runner import train


@pytest.mark.slow  # the quick tier leaves launches and large compiles out
def test_a_single_run_that_diverges_stops_in_one_line(tmp_path, monkeypatch, capsys):
    argv = [
        "launch.py",
        "--config=configs/fashion_mnist.py:smoke",
        "--config.data.synthetic_train=480",
        "--config.data.synthetic_test=200",
        "--config.num_clients=8",
        "--config.clients_per_round=3",
        "--config.num_rounds=6",
        "--config.eval_every=2",
        "--config.checkpoint_every=2",
        "--config.eval_batch_size=100",
        "--config.lr=1e6",  # SGD with momentum blows up at once
        f"--workdir={tmp_path}",
    ]
    monkeypatch.setattr(sys, "argv", argv)  # config_flags reads its overrides from sys.argv
    flags.FLAGS(argv)
    try:
        with pytest.raises(SystemExit) as info:
            launch.main(["launch.py"])
    finally:
        flags.FLAGS.unparse_flags()
    assert info.value.code == 2
    message = capsys.readouterr().err.strip().splitlines()[-1]
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    first = rows[-1]["diverged_round"]
    assert message == (
        f"error: the model diverged in round {first}: a non-finite loss or parameter "
        f"(lower lr or momentum?); metrics up to round {rows[-1]['round']} are in "
        f"{tmp_path}/metrics.jsonl"
    )
    assert rows[-1]["diverged"] and first <= rows[-1]["round"]
    assert all(not r["diverged"] for r in rows[:-1])
    assert not os.path.exists(tmp_path / "summary.json")
    assert not os.listdir(tmp_path / "checkpoints")  # a diverged state is never saved


@pytest.mark.slow  # a whole run
def test_in_a_sweep_only_the_diverged_experiment_is_marked(tmp_path, monkeypatch):
    c = tiny_config(num_rounds=5)  # evaluations after rounds 2, 4 and 5
    c.sweep.seed = (1, 2, 3)
    clean = train.train_and_evaluate(c, str(tmp_path / "clean"))
    make_round_step = simulation.make_round_step

    def nan_in_round_3_of_seed_2(*args, **kwargs):
        round_step = make_round_step(*args, **kwargs)

        def poisoned(state, scenario, data):
            nan = (scenario.seed == 2) & (state.round == 2)  # round 3 starts from NaN
            params = jax.tree.map(lambda p: jnp.where(nan, jnp.nan, p), state.params)
            return round_step(state.replace(params=params), scenario, data)

        return poisoned

    monkeypatch.setattr(simulation, "make_round_step", nan_in_round_3_of_seed_2)
    summary = train.train_and_evaluate(c, str(tmp_path / "nan"))

    assert summary["diverged"] == [{"experiment": 1, "round": 3}]
    rows = [json.loads(line) for line in open(tmp_path / "nan/metrics.jsonl")]
    clean_rows = [json.loads(line) for line in open(tmp_path / "clean/metrics.jsonl")]
    for row, clean_row in zip(rows, clean_rows, strict=True):
        if row["experiment"] == 1 and row["round"] >= 3:
            assert row["diverged"] and row["diverged_round"] == 3
            # A NaN model's predictions are no results: every measure is null.
            assert row["loss"] is None and row["accuracy"] is None
            assert row["attack_success_rate"] is None and row["recall"] is None
        elif row["experiment"] == 1:
            assert row == clean_row  # round 2, before the NaN
        else:
            assert row == clean_row  # the other experiments, bit for bit
    assert [r["diverged"] for r in summary["final"]] == [False, True, False]
    assert [r for r in summary["final"] if not r["diverged"]] == [
        r for r in clean["final"] if r["experiment"] != 1
    ]
