"""A metrics row's detection numbers: counts kept, undefined ratios null rather than 0."""

import numpy as np

from fedjax_poison.results import evaluation


def test_detection_counts_precision_and_recall_by_hand():
    row = evaluation.detection(np.array([3, 1, 2, 14]), np.array([1, 0, 1, 0, 0]))
    assert row["flagged"] == 2 and row["detection"] == {"tp": 3, "fp": 1, "fn": 2, "tn": 14}
    assert row["detection_precision"] == 3 / 4 and row["detection_recall"] == 3 / 5


def test_undefined_precision_and_recall_are_null_not_zero():
    nobody_flagged = evaluation.detection(np.array([0, 0, 4, 16]), np.zeros(5))
    assert nobody_flagged["detection_precision"] is None
    assert nobody_flagged["detection_recall"] == 0.0  # 4 attackers, none found
    no_attacker = evaluation.detection(np.array([0, 3, 0, 17]), np.zeros(5))
    assert no_attacker["detection_precision"] == 0.0  # 3 honest clients flagged
    assert no_attacker["detection_recall"] is None
