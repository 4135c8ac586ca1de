"""One definition per measure name, and every attack beside its clean twin: one small
matrix run (auto window), its files read back and compared."""

import csv
import glob
import json
import math

import numpy as np
import pytest
from scipy import stats as scipy_stats
from test_simulation import tiny_config

from fedjax_poison import compare_defenses
from fedjax_poison.config import plan as plan_lib
from fedjax_poison.results import stats, tables

STABLE = ("accuracy", "source_recall", "attack_success_rate")


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    """label_flip, sign_flip and backdoor (+ 'none') x fedavg x seeds 0, 1; 12 rounds
    evaluated every round and the default window: the evaluations of the last 10% (rounds
    11, 12)."""
    workdir = tmp_path_factory.mktemp("measures")
    c = tiny_config(num_rounds=12, eval_every=1)
    c.attack.malicious_fraction = 0.25
    attacks = ["label_flip", "sign_flip", "backdoor"]
    compare_defenses.compare(c, str(workdir), attacks, ["fedavg"], [0, 1])
    return workdir


def read_csv(path) -> list[dict]:
    return list(csv.DictReader(open(path)))


def number(text: str) -> float:
    return float(text) if text else math.nan


def close(a: float, b: float) -> bool:
    """Equal as the CSV files write them (6 significant digits), NaN equal to NaN."""
    return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=1e-5, abs=1e-9)


def test_the_run_and_the_tables_share_one_window():
    # 25 rounds evaluated every round: rounds 23, 24, 25 are in the last 10%.
    config = {"num_rounds": 25, "eval_every": 1, "eval_window": 0}
    assert plan_lib.eval_window(0, 25, 1) == stats.window_size(config, []) == 3
    assert plan_lib.eval_window(0, 12, 1) == stats.window_size({**config, "num_rounds": 12}, [])
    assert plan_lib.eval_window(4, 25, 1) == 4


@pytest.mark.slow  # the quick tier leaves launches and large compiles out
def test_every_file_carries_the_same_stable_measures(matrix):
    run = matrix / "run"
    rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    summary = json.load(open(run / "summary.json"))
    assert summary["eval_window"] == 2
    results = {int(r["experiment"]): r for r in read_csv(run / "results.csv")}
    md = open(run / "results.md").read()
    last = {r["experiment"]: r for r in rows}
    for e, mine in last.items():
        final = summary["final"][e]
        for m in STABLE:
            window = mine[f"{m}_window"]
            assert final[f"{m}_window"] == window
            if window is None:  # undefined (no flips): empty everywhere
                assert results[e][m] == "" and mine[m] is None
                continue
            stable = np.mean([r[m] for r in rows if r["experiment"] == e][-2:])
            assert close(number(results[e][m]), stable) and close(stable, window)
            assert close(number(results[e][f"{m}_final"]), mine[m])
        assert f"| {e} |" in md and f"{mine['accuracy_window']:.3f}" in md
    by_seed = {(r["attack"], r["defense"]): r for r in read_csv(run / "results_by_seed.csv")}
    cells = {(r["attack"], r["defense"]): r for r in read_csv(matrix / "matrix.csv")}
    matrix_md = open(matrix / "matrix.md").read()
    for key, group in by_seed.items():
        seeds = [last[e] for e in last if (last[e]["attack"], last[e]["defense"]) == key]
        for m in STABLE:
            values = [s[f"{m}_window"] for s in seeds if s[f"{m}_window"] is not None]
            mean = float(np.mean(values)) if values else math.nan
            assert close(number(group[f"{m}_mean"]), mean)
        acc = [s["accuracy_window"] for s in seeds]
        assert close(number(cells[key]["accuracy_mean"]), float(np.mean(acc)))
        # The interval of the mean, as in the figure and the LaTeX tables (Student t).
        ci95 = scipy_stats.t.ppf(0.975, len(acc) - 1) * np.std(acc, ddof=1) / len(acc) ** 0.5
        assert close(number(cells[key]["accuracy_ci95"]), ci95)
        assert f"{np.mean(acc):.3f} ± {ci95:.3f}" in matrix_md
        if cells[key]["measure"] == "flip":
            success = [s["attack_success_rate_window"] for s in seeds]
            assert close(number(cells[key]["success_mean"]), float(np.mean(success)))


@pytest.mark.slow  # the quick tier leaves launches and large compiles out
def test_each_attack_stands_beside_its_clean_twin(matrix):
    run = matrix / "run"
    rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    last = {r["experiment"]: r for r in rows}
    exps = json.load(open(run / "experiments.json"))
    cells = {r["attack"]: r for r in read_csv(matrix / "matrix.csv")}
    md = open(matrix / "matrix.md").read()
    for attack, metric in (("label_flip", "attack_success_rate"), ("sign_flip", "accuracy")):
        mine = [x for x in exps if x["attack"] == attack]
        attacked = [last[x["experiment"]][f"{metric}_window"] for x in mine]
        clean = [last[x["clean_twin"]][f"{metric}_window"] for x in mine]  # same seed
        diffs = np.subtract(attacked, clean)
        ci = stats.t_quantile(1) * np.std(diffs, ddof=1) / math.sqrt(2)
        cell = cells[attack]
        assert cell["effect_measure"] == metric
        assert close(number(cell["effect_clean"]), float(np.mean(clean)))
        assert close(number(cell["effect_diff_mean"]), float(np.mean(diffs)))
        assert close(number(cell["effect_diff_ci95"]), ci)
        words = "not distinguishable from no attack"
        if abs(np.mean(diffs)) > ci:
            words = "higher" if np.mean(diffs) > 0 else "lower"
        assert cell["effect"].startswith(words)
        text = f"{np.mean(attacked):.3f} vs {np.mean(clean):.3f} clean: {np.mean(diffs):+.3f}"
        assert text in md and f"{text} ± {ci:.3f}, {cell['effect']}" in md
    assert cells["none"]["effect"] == ""
    # a backdoor's baseline: the clean twin's triggered images predicted as its target
    mine = [x for x in exps if x["attack"] == "backdoor"]
    target = mine[0]["backdoor_target"]
    rate = lambda e: np.mean([r["triggered_to"][target] for r in rows if r["experiment"] == e][-2:])
    clean = [rate(x["clean_twin"]) for x in mine]
    attacked = [last[x["experiment"]]["attack_success_rate_window"] for x in mine]
    assert cells["backdoor"]["effect_measure"] == "attack_success_rate"
    assert close(number(cells["backdoor"]["effect_clean"]), float(np.mean(clean)))
    diff = float(np.mean(np.subtract(attacked, clean)))
    assert close(number(cells["backdoor"]["effect_diff_mean"]), diff)


@pytest.mark.slow  # the quick tier leaves launches and large compiles out
def test_each_cell_says_how_many_attackers_a_round_held(matrix):
    counts: dict[int, dict] = {}
    for path in glob.glob(str(matrix / "run" / "records" / "r*.npz")):
        with np.load(path) as z:
            for g, e in enumerate(z["experiment"].tolist()):
                per_round = z["malicious"][g].sum(-1)
                counts.setdefault(e, {}).update(zip(z["round"].tolist(), per_round.tolist()))
    exps = json.load(open(matrix / "run" / "experiments.json"))
    mine = [counts[x["experiment"]] for x in exps if x["attack"] == "label_flip"]
    assert all(len(c) == 12 for c in mine)
    mean = np.mean([np.mean(list(c.values())) for c in mine])
    share = np.mean([np.mean([v > 0 for v in c.values()]) for c in mine])
    cell = next(r for r in read_csv(matrix / "matrix.csv") if r["attack"] == "label_flip")
    assert close(number(cell["attackers_per_round"]), float(mean))
    assert close(number(cell["rounds_with_attacker"]), float(share))
    md = open(matrix / "matrix.md").read()
    assert f"{mean:.2f} a round, ≥ 1 in {share:.0%} of rounds" in md
    results = open(matrix / "run" / "results.md").read()
    assert f"{mean:.2f} a round, ≥ 1 in {share:.0%} of rounds" in results


def test_a_difference_within_its_interval_says_so():
    assert tables.effect_words(0.03, 0.05, 4) == "not distinguishable from no attack"
    assert tables.effect_words(0.2, 0.05, 4) == "higher than without attack"
    assert tables.effect_words(-0.2, 0.05, 4) == "lower than without attack"
    assert tables.effect_words(0.2, math.nan, 1).startswith("one seed: no interval")
    assert tables.effect_words(math.nan, math.nan, 0) == ""
