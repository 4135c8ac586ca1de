"""Defenses inside real runs: threat-model honesty, the offline PCA analysis, the comparison."""

import json

import numpy as np
import pytest
from test_simulation import tiny_config

from fedjax_poison import pca_analysis
from fedjax_poison.runner import train


def pca_config(**overrides):
    c = tiny_config(num_rounds=6, eval_every=2, **overrides)
    c.defense.name, c.defense.mode, c.defense.pca.start_round = "pca", "detect", 1
    return c


@pytest.mark.slow  # a whole run
def test_verdicts_do_not_see_the_ground_truth(tmp_path):
    # Nobody poisons before round 6, so the updates of rounds 1..5 are the same whoever is
    # called malicious: their flags must be the same too.
    flagged = []
    for fraction in (0.0, 0.5):
        c = pca_config(**{"attack.malicious_fraction": fraction, "attack.start_round": 6})
        workdir = tmp_path / str(fraction)
        train.train_and_evaluate(c, str(workdir))
        chunks = [np.load(p) for p in sorted((workdir / "records").glob("r*.npz"))]
        rounds = np.concatenate([chunk["round"] for chunk in chunks])
        flags = np.concatenate([chunk["flags"][0] for chunk in chunks])  # [rounds, k]
        flagged.append(flags[rounds < 6])
    assert flagged[0].shape == (5, 3) and flagged[0].any()  # the detector does flag someone
    np.testing.assert_array_equal(flagged[0], flagged[1])


@pytest.mark.slow  # a whole run
def test_features_and_offline_analysis(tmp_path):
    # The source known (the flip's, 6): the recorded rows are its rows, so a replay of the
    # rule on them is the run's own rule.
    c = pca_config(save_features=True, **{"attack.malicious_fraction": 0.5})
    c.defense.pca.source_class = 6
    summary = train.train_and_evaluate(c, str(tmp_path))
    assert 0 <= summary["detection_precision"] <= 1 and 0 <= summary["detection_recall"] <= 1
    rows = pca_analysis.load_features(str(tmp_path))
    assert rows["features"].shape == (6 * 3, 1568)  # rounds x clients, the head's inputs
    scores = pca_analysis.write_analysis(str(tmp_path), 0, 1, 6)
    assert 0.5 <= scores["cluster_purity"] <= 1 and scores["rows"] == 18
    for name in ("pca_scatter.png", "pca_verdicts.csv", "pca_analysis.json"):
        assert (tmp_path / name).stat().st_size > 0
    lines = open(tmp_path / "pca_verdicts.csv").read().splitlines()
    assert lines[0] == "client,malicious,flagged"
    malicious = set(json.load(open(tmp_path / "experiments.json"))[0]["malicious_clients"])
    for line in lines[1:]:
        client, truth, _ = map(int, line.split(","))
        assert truth == (client in malicious)
    # The recorded rounds replay the rule offline: the same flags as the run's own.
    rounds = pca_analysis.load_rounds(str(tmp_path))[0]
    assert rounds["target"].shape == (6, 3, 1568) and rounds["global_rows"].shape == (6, 2, 1568)
    (replayed,) = pca_analysis.replay([rounds])
    np.testing.assert_array_equal(replayed, rounds["flagged"])
