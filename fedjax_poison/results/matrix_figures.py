"""Figures that compare: attacks x defenses as heatmaps, several runs overlaid."""

import math
import textwrap

import numpy as np

from fedjax_poison.results import stats, tables
from fedjax_poison.results.figures import (
    CLEAN,
    draw_lines,
    extra_handles,
    format_axes,
    group_curve,
    legend,
    line_style,
    merged_lines,
    panel_metrics,
    plt,
    seeds_words,
    setting_label,
    split_keys,
    suptitle,
    title,
)

PANELS = {  # measure -> (panel title, diverging colour map or None)
    "accuracy": ("test accuracy", None),
    "attack_success_rate": ("attack success rate (flips, backdoors)", None),
    "attack_success_rate_vs_clean": ("success rate − clean twin (paired by seed)", "RdBu_r"),
    "accuracy_vs_clean": ("accuracy − clean twin (paired by seed)", "RdBu"),
}
MAX_WIDTH = 13.3  # inches: 2,000 px at 150 dpi


def shown(metric: str, row: dict) -> bool:
    """Whether a group has a cell in a panel: success only for targeted attacks,
    differences only for attacked groups."""
    if metric.startswith("attack_success_rate"):
        return row["measure"] in ("flip", "backdoor")
    return metric == "accuracy" or not tables.is_clean(row)


def color_scale(values: np.ndarray, diverging: str | None):
    """(vmin, vmax, cmap): fit to the finite values; a diverging map centred on 0."""
    finite = values[np.isfinite(values)]
    if diverging:
        limit = max(float(np.abs(finite).max()) if finite.size else 0.0, 0.01)
        return -limit, limit, diverging
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    pad = max(0.01, 0.05 * (high - low))
    return low - pad, high + pad, "viridis"


def heatmap(ax, cells: dict, attacks, defenses, metric: str, numbers: bool = True) -> None:
    """One measure per attack x defense, mean ± CI95 written in the cells (numbers), the
    differences marked 'n.s.' where their interval holds 0."""
    values = np.full((len(attacks), len(defenses)), np.nan)
    texts = np.full(values.shape, "–", dtype=object)
    for i, a in enumerate(attacks):
        for j, d in enumerate(defenses):
            r = cells.get((a, d))
            if not r or not shown(metric, r):
                continue
            if r["diverged"] == r["seeds"]:
                ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, color="0.75"))
                texts[i, j] = "diverged"
            elif math.isfinite(r[f"{metric}_mean"]):
                values[i, j], ci = r[f"{metric}_mean"], r[f"{metric}_ci95"]
                texts[i, j] = (
                    f"{values[i, j]:+.2f}" if "vs_clean" in metric else f"{values[i, j]:.2f}"
                )
                texts[i, j] += f"\n±{ci:.2f}" if math.isfinite(ci) else ""
                if "vs_clean" in metric and stats.distinguishable(values[i, j], ci) is False:
                    texts[i, j] += " n.s."
                texts[i, j] += f"\n({r['diverged']} diverged)" if r["diverged"] else ""
    vmin, vmax, cmap = color_scale(values, PANELS[metric][1])
    image = ax.imshow(np.ma.masked_invalid(values), vmin=vmin, vmax=vmax, cmap=cmap, aspect="auto")
    if numbers:
        write_cells(ax, image, values, texts)
    ax.grid(False)
    ax.set_xticks(range(len(defenses)), defenses, rotation=30, ha="right")
    ax.set_yticks(range(len(attacks)), attacks)
    ax.figure.colorbar(image, ax=ax, shrink=0.8)


def write_cells(ax, image, values: np.ndarray, texts: np.ndarray) -> None:
    """Each cell's text on its heatmap, white on dark colours, black on light ones."""
    for (i, j), text in np.ndenumerate(texts):
        v = values[i, j]
        rgb = image.cmap(image.norm(v))[:3] if math.isfinite(v) else (1, 1, 1)
        dark = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2] < 0.5
        ax.text(j, i, text, ha="center", va="center", fontsize=7, color="w" if dark else "k")


def matrix_figure(run: tables.Run, table, rows):
    """Attacks x defenses heatmaps, one panel per measure (accuracy, success, and each
    against the clean twin), two panels a row (one, for more than 11 defenses); a set of
    panels per value of the other swept settings that vary within an attack (flips that
    come with the attack do not split it). Cells under 0.3 in (over 38 defenses) show
    colours only: matrix.md/csv hold the numbers."""
    names = tables.class_names(run.config.get("dataset", ""))
    attacks = list(dict.fromkeys(r["attack"] for r in rows))
    defenses = list(dict.fromkeys(r["defense"] for r in rows))
    other = split_keys(rows, tables.varying(rows, tables.group_keys()), "attack")
    other = [k for k in other if k != "defense"]
    combo = lambda r: tuple(str(r[k]) for k in other)
    combos = list(dict.fromkeys(combo(r) for r in rows))
    metrics = [
        m for m in PANELS if any(shown(m, r) and math.isfinite(r[f"{m}_mean"]) for r in rows)
    ] or ["accuracy"]
    # Two panels a row while a cell keeps room for "0.85 / ±0.04" (0.4 in); one a row beyond.
    ncols = min(2, len(metrics)) if 4.5 / len(defenses) >= 0.4 else 1
    cell = min(1.0, 4.5 / len(defenses)) if ncols == 2 else min(0.8, 11.5 / len(defenses))
    per_combo = -(-len(metrics) // ncols)
    panel = (1.8 + cell * len(defenses), 0.9 + 0.45 * len(attacks))
    size = (min(MAX_WIDTH, ncols * panel[0]), 1.0 + panel[1] * per_combo * len(combos))
    fig, axes = plt.subplots(
        per_combo * len(combos), ncols, squeeze=False, layout="constrained", figsize=size
    )
    for i, values in enumerate(combos):
        cells = {(r["attack"], r["defense"]): r for r in rows if combo(r) == values}
        settings = ", ".join(setting_label(k, v, names) for k, v in zip(other, values))
        mine = axes[i * per_combo : (i + 1) * per_combo].flat
        for n, ax in enumerate(mine):
            if n >= len(metrics):
                ax.set_visible(False)
                continue
            heatmap(ax, cells, attacks, defenses, metrics[n], numbers=cell >= 0.3)
            ax.set_title(f"{settings + ': ' if settings else ''}{PANELS[metrics[n]][0]}")
    seeds = max(r["seeds"] for r in rows)
    what = "attacks x defenses, stable measures"
    what += f", {seeds_words(seeds)} ± 95% CI" if seeds > 1 else ""
    what += "; n.s.: not distinguishable from no attack (its 95% CI holds 0)"
    suptitle(fig, title(run, rows, what))
    return fig


def overlay_figure(runs, tables_, rows_of):
    """The curves of several runs in one figure, a line per run and group."""
    every = [r for rows in rows_of for r in rows]
    metrics = panel_metrics(every)
    fig, axes = plt.subplots(
        1,
        len(metrics),
        squeeze=False,
        layout="constrained",
        figsize=(1.5 + 3.8 * len(metrics), 4.6),
    )
    keys = ["run", *tables.varying(every, tables.group_keys())]
    entries, dashes = [], iter(["--", ":", "-.", (0, (5, 1, 1, 1))] * 100)
    styles = (line_style(i) for i in range(10**6))  # no two attacked lines alike
    for run, table, rows in zip(runs, tables_, rows_of):
        for row in rows:
            clean = tables.is_clean(row)
            style = {**CLEAN, "linestyle": next(dashes)} if clean else next(styles)
            curves = {m: group_curve(run, table, row, m) for m in metrics}
            entries.append((row, style, curves))
    names = tables.class_names(runs[0].config.get("dataset", ""))
    handles = draw_lines(axes[0], metrics, merged_lines(entries, keys, names))
    for ax, metric in zip(axes[0], metrics):
        format_axes(ax, metric)
    legend(fig, handles + extra_handles(every), ncol=2)
    described = []
    for run in runs:
        synthetic = ", synthetic data" if run.data_source == "synthetic" else ""
        described.append(f"{run.name} ({run.config.get('dataset', '?')}{synthetic})")
    fig.suptitle("\n".join(textwrap.wrap(f"{len(runs)} runs: " + "; ".join(described), 110)))
    return fig
