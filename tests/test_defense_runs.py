"""Defenses inside real runs: threat-model honesty, the offline PCA analysis, the comparison."""

import json

import numpy as np
from test_simulation import tiny_config

from fedjax_poison import compare_defenses, pca_analysis, report, train


def pca_config(**overrides):
    c = tiny_config(num_rounds=6, eval_every=2, **overrides)
    c.defense.name, c.defense.mode, c.defense.start_round = "pca", "detect", 1
    return c


def test_verdicts_do_not_see_the_ground_truth(tmp_path):
    # Nobody poisons (the attack window starts after the run), so the updates are the same
    # whoever is called malicious: the flags must be the same too.
    flagged = []
    for fraction in (0.0, 0.5):
        c = pca_config(**{"attack.malicious_fraction": fraction, "attack.start_round": 100})
        train.train_and_evaluate(c, str(tmp_path / str(fraction)))
        rows = report.read_lines(str(tmp_path / str(fraction) / "metrics.jsonl"))
        flagged.append([r["flagged"] for r in rows])
    assert flagged[0] == flagged[1]


def test_features_and_offline_analysis(tmp_path):
    c = pca_config(save_features=True, **{"attack.malicious_fraction": 0.5})
    summary = train.train_and_evaluate(c, str(tmp_path))
    assert 0 <= summary["detection_precision"] <= 1 and 0 <= summary["detection_recall"] <= 1
    rows = pca_analysis.load_features(str(tmp_path))
    assert rows["features"].shape == (6 * 3, 1568)  # rounds x clients, the head's inputs
    scores = pca_analysis.write_analysis(str(tmp_path), 0, 0, 5)
    assert 0.5 <= scores["cluster_purity"] <= 1 and scores["rows"] == 18
    for name in ("pca_scatter.png", "pca_verdicts.csv", "pca_analysis.json"):
        assert (tmp_path / name).stat().st_size > 0
    lines = open(tmp_path / "pca_verdicts.csv").read().splitlines()
    assert lines[0] == "client,malicious,flagged"
    malicious = set(json.load(open(tmp_path / "malicious.json"))[0]["malicious_clients"])
    for line in lines[1:]:
        client, truth, _ = map(int, line.split(","))
        assert truth == (client in malicious)


def test_comparison_table_has_a_row_per_defense(tmp_path):
    c = tiny_config(num_rounds=2, **{"attack.malicious_fraction": 0.25})
    rows = compare_defenses.compare(c, str(tmp_path), ["median", "bulyan"])
    compare_defenses.write_tables(str(tmp_path), rows)
    assert [r["defense"] for r in rows] == ["fedavg", "median", "bulyan"]
    assert rows[0]["time_vs_fedavg"] == 1.0 and np.isfinite(rows[1]["accuracy"])
    assert rows[2]["note"].startswith("not run: defense.")  # 3 clients per round are too few
    assert open(tmp_path / "defenses.md").read().count("\n") == 5
