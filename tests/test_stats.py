"""Stable measures and statistics across seeds, on numbers checked by hand."""

import math

import pytest

from fedjax_poison.results import stats


def test_evaluation_rounds_end_with_the_last_round():
    assert stats.evaluation_rounds(20, 5) == [5, 10, 15, 20]
    assert stats.evaluation_rounds(12, 5) == [5, 10, 12]
    assert stats.evaluation_rounds(3, 5) == [3]


def test_the_default_window_covers_the_last_tenth_of_the_rounds():
    # 200 rounds evaluated every 5: rounds 185, 190, 195, 200 are after round 180.
    assert stats.auto_window(stats.evaluation_rounds(200, 5), 200) == 4
    assert stats.auto_window(stats.evaluation_rounds(100, 1), 100) == 10
    # 20 rounds every 5: only round 20 is after round 18; never fewer than one.
    assert stats.auto_window(stats.evaluation_rounds(20, 5), 20) == 1
    assert stats.auto_window([5], 200) == 1


def test_window_size_prefers_the_argument_then_the_config():
    config = {"num_rounds": 200, "eval_every": 5, "eval_window": 0}
    assert stats.window_size(config, []) == 4
    assert stats.window_size({**config, "eval_window": 6}, []) == 6
    assert stats.window_size({**config, "eval_window": 6}, [], override=2) == 2
    # Without eval_every, the rounds the metrics hold: 10 of 100 rounds evaluated, 91..100.
    assert stats.window_size({"num_rounds": 100}, list(range(91, 101)) * 2) == 10


def test_tail_mean_and_final():
    series = {5: 0.1, 10: 0.3, 15: 0.5}
    assert stats.tail_mean(series, 2) == pytest.approx(0.4)
    assert stats.tail_mean(series, 10) == pytest.approx(0.3)  # a run cut short: all it has
    assert stats.final(series) == 0.5
    assert math.isnan(stats.tail_mean({}, 2)) and math.isnan(stats.final({}))


def test_window_gap_is_a_mean_over_the_rounds_both_have():
    mine = {5: 0.5, 10: 0.6, 15: 0.7}
    clean = {5: 0.9, 10: 0.9, 15: 0.8}
    # last two rounds: (0.9 - 0.6 + 0.8 - 0.7) / 2
    assert stats.window_gap(mine, clean, 2) == pytest.approx(0.2)
    assert stats.window_gap(mine, {15: 0.8}, 2) == pytest.approx(0.1)
    assert math.isnan(stats.window_gap(mine, {1: 0.8}, 2))


def test_spread_uses_the_sample_std_and_student_t():
    s = stats.spread([1.0, 2.0, 3.0])
    assert (s.mean, s.std, s.n) == (2.0, 1.0, 3)
    assert s.ci95 == pytest.approx(4.302653 / math.sqrt(3), rel=1e-6)  # t(0.975, 2)
    assert stats.t_quantile(1) == pytest.approx(12.7062, rel=1e-5)
    one = stats.spread([0.4, math.nan, None])
    assert one.mean == 0.4 and one.n == 1 and math.isnan(one.std) and math.isnan(one.ci95)
    assert stats.spread([]).n == 0 and math.isnan(stats.spread([]).mean)


def test_paired_differences_keep_seeds_both_have():
    values = {0: 0.5, 1: 0.7, 2: math.nan, 3: 0.1}
    clean = {0: 0.8, 1: 0.9, 2: 0.9}
    assert stats.paired_differences(values, clean) == pytest.approx([-0.3, -0.2])


def test_mean_curve_counts_the_seeds_of_each_round():
    curve = stats.mean_curve([{5: 0.2, 10: 0.4}, {5: 0.4}])
    assert curve.rounds.tolist() == [5, 10]
    assert curve.mean.tolist() == pytest.approx([0.3, 0.4])
    assert curve.n.tolist() == [2, 1]
    # two values 0.2 and 0.4: std 0.1414, t(0.975, 1) = 12.706
    assert curve.ci95[0] == pytest.approx(12.7062 * 0.141421 / math.sqrt(2), rel=1e-4)
    assert math.isnan(curve.ci95[1])


def test_over_seeds_leaves_diverged_experiments_out():
    entries = [
        {"experiment": e, "fraction": f, "diverged": d, "acc": a}
        for e, (f, d, a) in enumerate(
            [(0.5, None, 0.6), (0.5, None, 0.8), (0.5, 7, math.nan), (0.0, None, 0.9)]
        )
    ]
    attacked, clean = stats.over_seeds(entries, ["fraction"], [], ["acc"])
    assert attacked["seeds"] == 3 and attacked["diverged"] == 1
    assert attacked["diverged_rounds"] == [7] and attacked["experiments"] == [0, 1, 2]
    assert attacked["acc_mean"] == pytest.approx(0.7) and attacked["acc_n"] == 2
    assert clean["acc_n"] == 1 and math.isnan(clean["acc_ci95"])
