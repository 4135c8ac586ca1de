"""The rows of metrics.jsonl: one per experiment and evaluation, from what the device returned.

Each row holds the evaluation's measures (from the confusion matrix), what the rounds since
the last evaluation did (from their records), the defense's cumulative detection counts,
and the stable measures: the mean of a measure over the experiment's last W evaluations
(`<measure>_window`), which does not swing with how many attackers one round selected.
A diverged experiment's measures are null from its divergence on: a NaN model's
predictions are not results.
"""

import math
from collections.abc import Sequence

import numpy as np

from fedjax_poison.results import stats
from fedjax_poison.round import metrics

MEASURES = ("accuracy", "recall", "precision", "source_recall", "target_precision")
MEASURES += ("attack_success_rate", "loss", "triggered_to")
STABLE = ("accuracy", "source_recall", "attack_success_rate")


def experiment_row(
    exp_index: int, exp, attack, confusion: np.ndarray, round_done: int, flips=None
) -> dict:
    """The measures of one evaluation: confusion [V, C, C] (V = 2 with the triggered test set);
    source recall and attack success rate on `flips` (default: the experiment's own). With a
    triggered test set, `triggered_to` [C]: the backdoor success rate each class would have
    as the target (a clean twin's baseline for a backdoor)."""
    row = {"round": round_done, "experiment": exp_index}
    row.update({k: list(v) if isinstance(v, tuple) else v for k, v in exp.axes.items()})
    row.update(metrics.summarize(confusion[0], exp.flips if flips is None else flips))
    if len(confusion) > 1:  # the triggered test set: every target's rate, for clean twins
        row["triggered_to"] = [metrics.backdoor_success(confusion[1], t) for t in
                               range(confusion.shape[-1])]  # fmt: skip
    if attack.measure == "backdoor":
        row["attack_success_rate"] = metrics.backdoor_success(confusion[1], attack.target)
    return row


def chunk_facts(records, g: int) -> dict:
    """What the rounds of a chunk did for slot g: records [G, R, k] ([G, R] for flags of rounds)."""
    return {
        "malicious_selected": int(records.malicious[g, -1].sum()),
        "poisoned_selected": int(records.poisoned[g, -1].sum()),
        "poisoned_rounds": int(records.poisoned[g].any(-1).sum()),  # rounds of the chunk
        "loss": float(records.loss[g, -1].mean()),
        "invalid_updates": int((~records.valid[g]).sum()),
    }


def detection(detected: np.ndarray, flags_last_round: np.ndarray) -> dict:
    """The defense's flags: cumulative (tp, fp, fn, tn) [4] and the evaluated round's flags.
    Precision is null while nobody was flagged, recall while no attacker was selected
    (undefined, not 0); `detection` keeps the counts, false positives included."""
    tp, fp, fn, tn = (int(v) for v in detected)
    precision, recall = stats.detection_ratios(tp, fp, fn)
    return {
        "flagged": int(flags_last_round.sum()),
        "detection": {"tp": tp, "fp": fp, "fn": fn, "tn": tn},
        "detection_precision": precision,
        "detection_recall": recall,
    }


def blank_diverged(row: dict, diverged_round: int) -> dict:
    """The row of an experiment that went non-finite: its measures null, the round named."""
    if diverged_round:
        for key in MEASURES:
            if key in row or key != "triggered_to":  # triggered_to only with a trigger
                row[key] = None
        row["diverged_round"] = diverged_round
    row["diverged"] = bool(diverged_round)
    return row


def add_window(row: dict, history: Sequence[dict], window: int) -> dict:
    """Adds `<measure>_window`: stats.tail_mean over the last `window` rows (this one
    included) of the experiment, as every table computes it; null when any of them is null
    (undefined, or diverged)."""
    recent = [*history, row]
    for key in STABLE:
        values = {r["round"]: stats.as_float(r.get(key)) for r in recent}
        mean = stats.tail_mean(values, window)
        row[f"{key}_window"] = mean if math.isfinite(mean) else None
    return row
