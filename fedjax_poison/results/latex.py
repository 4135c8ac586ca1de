"""results.tex: the numbers of results.md as booktabs tables for a paper.

    \\usepackage{booktabs}   % in the paper's preamble

One table across seeds (mean ± CI95 of the stable measures, n the seeds used), one of each
attacked group against its clean twin (this, the clean twin, their difference paired by
seed ± CI95; "n.s." where the interval holds 0), and for a run with attacks and defenses
swept the attack x defense grid of accuracy. The numbers are those of results_by_seed.csv
(tables.by_seed_table), rounded as results.md rounds them.
"""

import math
from collections.abc import Sequence

from fedjax_poison.results import stats, tables

SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#"}
SPECIAL |= {"_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\^{}"}
SPECIAL |= {"→": r"$\to$", "±": r"$\pm$", "≥": r"$\geq$", "−": "-"}
MATRIX_KEYS = {"attack", "defense", "malicious_fraction", "flips"}  # they come with an attack
NAMES = {  # column headers
    "accuracy": "accuracy",
    "source_recall": "source recall",
    "attack_success_rate": "attack success",
    "source_recall_loss": "source recall loss",
    "accuracy_drop": "accuracy drop",
    "other_accuracy": "other classes",
}


def escape(text) -> str:
    """Text as LaTeX typesets it literally."""
    return "".join(SPECIAL.get(ch, ch) for ch in str(text))


def mean_ci(mean: float, ci: float, signed: bool = False) -> str:
    """'0.812 $\\pm$ 0.004' (the ± part from two seeds on), '' when undefined."""
    if not math.isfinite(mean):
        return ""
    text = f"{mean:+.3f}" if signed else f"{mean:.3f}"
    return text + (rf" $\pm$ {ci:.3f}" if math.isfinite(ci) else "")


def tabular(header: Sequence[str], body: Sequence[Sequence[str]], caption: str) -> list[str]:
    """A booktabs table (its columns after the first left out where empty)."""
    keep = [i for i, _ in enumerate(header) if i == 0 or any(cells[i] for cells in body)]
    align = "".join("l" if i == 0 else "r" for i in range(len(keep)))
    row = lambda cells: " & ".join(cells[i] for i in keep) + r" \\"
    return [
        r"\begin{table}[t]",
        r"\centering",
        r"\small",
        rf"\caption{{{caption}}}",
        rf"\begin{{tabular}}{{{align}}}",
        r"\toprule",
        row([escape(h) for h in header]),
        r"\midrule",
        *(row(cells) for cells in body),
        r"\bottomrule",
        r"\end{tabular}",
        r"\end{table}",
        "",
    ]


def what_ran(run: tables.Run) -> str:
    """The caption's first sentence: dataset, clients, rounds, the stable window."""
    c = run.config
    last = "evaluation" if run.window == 1 else f"{run.window} evaluations"
    partition = tables.partition_words(c)
    return escape(
        f"{c.get('dataset', '?')} ({run.data_source} data), "
        + (f"{partition}, " if partition else "")
        + f"{c.get('num_clients', '?')} "
        f"clients ({c.get('clients_per_round', '?')} a round), {c.get('num_rounds', '?')} "
        f"rounds; stable measures: the mean of the last {last}"
    )


def settings_cells(row: dict, keys: Sequence[str]) -> list[str]:
    return [escape(tables.format_setting(k, row[k])) for k in keys]


def seeds_table(run: tables.Run, by_seed: Sequence[dict], keys: Sequence[str]) -> list[str]:
    """Mean ± CI95 over seeds of the stable measures, a row per group."""
    body = [
        [*settings_cells(row, keys), str(row["seeds"] - row["diverged"])]
        + [mean_ci(row[f"{m}_mean"], row[f"{m}_ci95"]) for m in tables.SHOWN]
        for row in by_seed
    ]
    caption = f"{what_ran(run)}. Mean $\\pm$ 95\\% CI over n seeds (Student t)."
    return tabular([*keys, "n", *(NAMES[m] for m in tables.SHOWN)], body, caption)


def against_clean(row: dict, metric: str) -> list[str]:
    """This, the clean twin, and the paired difference ± CI95 ('n.s.' where it holds 0)."""
    diff, ci = row[f"{metric}_vs_clean_mean"], row[f"{metric}_vs_clean_ci95"]
    if not math.isfinite(diff):
        return ["", "", ""]
    text = mean_ci(diff, ci, signed=True)
    text += " n.s." if stats.distinguishable(diff, ci) is False else ""
    return [f"{row[f'{metric}_mean']:.3f}", f"{row[f'{metric}_clean_mean']:.3f}", text]


def twin_table(run: tables.Run, by_seed: Sequence[dict], keys: Sequence[str]) -> list[str]:
    """Each attacked group against its clean twin: accuracy and attack success."""
    rows = [r for r in by_seed if not tables.is_clean(r) and r["accuracy_vs_clean_n"]]
    if not rows:
        return []
    metrics = ("accuracy", "attack_success_rate")
    body = [
        [*settings_cells(row, keys), escape(tables.attackers_text(row))]
        + [c for m in metrics for c in against_clean(row, m)]
        for row in rows
    ]
    header = [*keys, "malicious clients selected"]
    for m in metrics:
        header += [NAMES[m], "clean", "difference"]
    caption = (
        f"{what_ran(run)}. Each attack against its clean twin (no attack, the same seeds): "
        "the difference paired by seed $\\pm$ its 95\\% CI; n.s.: the interval holds 0, "
        "not distinguishable from no attack."
    )
    return tabular(header, body, caption)


def matrix_table(run: tables.Run, by_seed: Sequence[dict]) -> list[str]:
    """Attacks (rows) x defenses (columns): accuracy, mean ± CI95, where both vary and
    nothing else does."""
    keys = tables.varying(by_seed, tables.group_keys())
    if not {"attack", "defense"} <= set(keys) or set(keys) - MATRIX_KEYS:
        return []
    attacks = list(dict.fromkeys(r["attack"] for r in by_seed))
    defenses = list(dict.fromkeys(r["defense"] for r in by_seed))
    at = {(r["attack"], r["defense"]): r for r in by_seed}
    body = []
    for a in attacks:
        cells = [at.get((a, d)) for d in defenses]
        text = [mean_ci(c["accuracy_mean"], c["accuracy_ci95"]) if c else "" for c in cells]
        body.append([escape(a), *text])
    caption = f"{what_ran(run)}. Test accuracy, attacks x defenses: mean $\\pm$ 95\\% CI."
    return tabular(["attack", *defenses], body, caption)


def format_latex(run: tables.Run, by_seed: Sequence[dict]) -> str:
    """results.tex: the tables of this module, each a table environment."""
    keys = tables.varying(by_seed, tables.group_keys())
    lines = [r"% booktabs tables of the stable measures; \usepackage{booktabs}", ""]
    lines += matrix_table(run, by_seed) + seeds_table(run, by_seed, keys)
    lines += twin_table(run, by_seed, keys)
    return "\n".join(lines)
