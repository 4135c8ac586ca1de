"""The round and the run loop on small synthetic problems: compile once, vmap clients, outputs."""

import csv
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_poison.config import configuration, plan
from fedjax_poison.round import client, server, simulation
from fedjax_poison.runner import train

METRIC_KEYS = {
    "round",
    "accuracy",
    "recall",
    "precision",
    "source_recall",
    "attack_success_rate",
    "malicious_selected",
}


def tiny_config(**overrides):
    c = configuration.smoke(configuration.paper_config("fashion_mnist"))
    c.data.synthetic_train, c.data.synthetic_test = 480, 200
    c.num_clients, c.clients_per_round, c.num_rounds, c.eval_every = 8, 3, 5, 2
    c.eval_batch_size = 100
    for key, value in overrides.items():
        target = c
        *path, last = key.split(".")
        for p in path:
            target = target[p]
        target[last] = value
    return c


def test_fedavg_of_two_toy_clients_by_hand():
    trees = {"w": jnp.array([[1.0, 2.0], [3.0, 6.0]]), "b": jnp.array([0.0, 4.0])}
    mean = server.weighted_mean(trees, jnp.array([0.5, 0.5]))
    assert mean["w"].tolist() == [2.0, 4.0] and float(mean["b"]) == 2.0
    skewed = server.weighted_mean(trees, jnp.array([0.75, 0.25]))
    assert skewed["w"].tolist() == [1.5, 3.0]


@pytest.mark.slow  # a whole run
def test_one_compile_per_run_and_no_python_loop_over_clients(tmp_path, monkeypatch):
    traces = {"round": 0, "local_train": 0}
    make_round, make_local = simulation.make_round_step, client.make_local_train

    def counting_round(*args, **kwargs):
        step = make_round(*args, **kwargs)

        def counted(*a):
            traces["round"] += 1
            return step(*a)

        return counted

    def counting_local(*args, **kwargs):
        local = make_local(*args, **kwargs)

        def counted(*a):
            traces["local_train"] += 1
            return local(*a)

        return counted

    monkeypatch.setattr(simulation, "make_round_step", counting_round)
    monkeypatch.setattr(client, "make_local_train", counting_local)
    # 7 rounds in chunks of 3, 3, 1: still one trace of the round.
    train.train_and_evaluate(tiny_config(num_rounds=7, eval_every=3), str(tmp_path))
    assert traces == {"round": 1, "local_train": 1}  # k clients, one vmapped trace


@pytest.mark.slow  # the quick tier leaves launches and large compiles out
def test_run_writes_every_output(tmp_path):
    c = tiny_config(**{"attack.malicious_fraction": 0.5})
    summary = train.train_and_evaluate(c, str(tmp_path))
    for name in ("config.json", "metrics.jsonl", "summary.json", "curves.png", "experiments.json"):
        assert os.path.getsize(tmp_path / name) > 0, name
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["round"] for r in rows] == [2, 4, 5]
    assert METRIC_KEYS <= set(rows[0])
    assert len(rows[0]["recall"]) == 10 and 0 <= rows[-1]["accuracy"] <= 1
    assert summary["final"][0]["accuracy"] == rows[-1]["accuracy"]
    for key in ("compile_s", "rounds_per_s", "examples_per_s"):
        assert summary[key] > 0
    malicious = json.load(open(tmp_path / "experiments.json"))[0]["malicious_clients"]
    assert len(malicious) == 4  # half of 8 clients
    assert json.load(open(tmp_path / "config.json"))["attack"]["malicious_fraction"] == 0.5


@pytest.mark.slow  # a whole run
def test_same_seed_same_metrics(tmp_path):
    c = tiny_config(**{"attack.malicious_fraction": 0.25})
    train.train_and_evaluate(c, str(tmp_path / "a"))
    train.train_and_evaluate(c, str(tmp_path / "b"))
    assert open(tmp_path / "a/metrics.jsonl").read() == open(tmp_path / "b/metrics.jsonl").read()


@pytest.mark.slow  # a whole run
def test_sweep_equals_each_experiment_alone(tmp_path):
    sweep = tiny_config(num_rounds=4)
    sweep.sweep.malicious_fraction = (0.0, 0.5)
    sweep.sweep.seed = (1, 2)
    rows = train.train_and_evaluate(sweep, str(tmp_path / "sweep"))["final"]
    assert len(rows) == 4
    # A clean and an attacked experiment, of different seeds and groups, each run alone.
    picked = [r for r in rows if (r["malicious_fraction"], r["seed"]) in ((0.0, 1), (0.5, 2))]
    assert len(picked) == 2
    for row in picked:
        alone = tiny_config(
            num_rounds=4,
            seed=row["seed"],
            **{"attack.malicious_fraction": row["malicious_fraction"]},
        )
        single = train.train_and_evaluate(alone, str(tmp_path / f"e{row['experiment']}"))["final"][
            0
        ]
        assert single["malicious_selected"] == row["malicious_selected"]
        np.testing.assert_allclose(single["recall"], row["recall"], atol=0.02)
        assert abs(single["accuracy"] - row["accuracy"]) < 0.01


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("clients_per_round", 99, "clients_per_round must be <= num_clients"),
        ("attack.malicious_fraction", 1.5, "attack.malicious_fraction must be in"),
        ("attack.flips", "6:6", "attack.flips must flip a class to a different class"),
        ("attack.flips", "6:10", "attack.flips classes must be in"),
        ("data.source", "web", "data.source must be one of"),
        ("num_rounds", 0, "num_rounds must be a positive integer"),
        ("batch_size", -4, "batch_size must be a positive integer"),
        ("dataset", "svhn", "dataset must be one of"),
        ("attack.start_round", 9, "attack.start_round must be <= num_rounds"),
        ("attack.flips", "", "attack.flips is empty: label_flip with these settings flips nothing"),
        ("sweep.seed", (0, 0), "sweep.seed lists 0 twice"),
        ("attack.malicious_fraction", 0.05, "is no attacker at all"),
    ],
)
def test_bad_config_stops_with_the_field_named(field, value, message, tmp_path):
    with pytest.raises(configuration.ConfigError, match=message):
        train.train_and_evaluate(tiny_config(**{field: value}), str(tmp_path))


def test_experiment_groups_pad_the_last_group():
    assert plan.experiment_groups(5, 2) == [[0, 1], [2, 3], [4, 4]]
    assert plan.experiment_groups(3, 0) == [[0, 1, 2]]


@pytest.mark.slow  # a whole run
def test_chunked_sweep_matches_the_whole_sweep(tmp_path):
    whole = tiny_config(num_rounds=3)
    whole.sweep.malicious_fraction = (0.0, 0.25, 0.5)
    chunked = tiny_config(num_rounds=3)
    chunked.sweep.malicious_fraction = (0.0, 0.25, 0.5)
    chunked.sweep.max_parallel = 2
    a = train.train_and_evaluate(whole, str(tmp_path / "a"))["final"]
    b = train.train_and_evaluate(chunked, str(tmp_path / "b"))["final"]
    assert [r["experiment"] for r in b] == [0, 1, 2]
    for ra, rb in zip(a, b):
        assert ra["malicious_selected"] == rb["malicious_selected"]
        assert abs(ra["accuracy"] - rb["accuracy"]) < 0.01
    lines = open(tmp_path / "b/metrics.jsonl").read().splitlines()
    assert len(lines) == 3 * 2  # evaluations after rounds 2 and 3, no duplicated padding rows


@pytest.mark.slow  # a whole run
def test_a_clean_twin_is_measured_on_the_pairs_its_attacked_twins_flip(tmp_path):
    """The clean experiment's source recall and attack success rate are its attacked twins'
    reference: read on their flips from its own confusion matrix."""
    c = tiny_config(num_rounds=2, eval_every=2, **{"attack.flips": "6:0"})
    c.sweep.malicious_fraction = (0.0, 0.5)
    train.train_and_evaluate(c, str(tmp_path))
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    (clean,) = [r for r in rows if r["malicious_fraction"] == 0.0]
    # One records file per group of experiments (the clean twin's group is its own cell).
    chunks = [np.load(p) for p in sorted((tmp_path / "records").glob("r*.npz"))]
    (confusion,) = [
        chunk["confusion"][list(chunk["experiment"]).index(clean["experiment"])]
        for chunk in chunks
        if clean["experiment"] in list(chunk["experiment"])
    ]
    assert clean["source_recall"] == pytest.approx(confusion[6, 6] / confusion[6].sum())
    assert clean["attack_success_rate"] == pytest.approx(confusion[6, 0] / confusion[6].sum())
    by_seed = list(csv.DictReader(open(tmp_path / "results_by_seed.csv")))
    attacked = next(r for r in by_seed if r["malicious_fraction"] == "0.5")
    assert attacked["attack_success_rate_vs_clean_mean"] != ""  # the paired difference
