"""Figures that compare: attacks x defenses as heatmaps, several runs overlaid."""

import math
import textwrap

import numpy as np

from fedjax_poison.results import tables
from fedjax_poison.results.figures import (
    CLEAN,
    COLORS,
    draw_lines,
    extra_handles,
    format_axes,
    group_curve,
    legend,
    merged_lines,
    panel_metrics,
    plt,
    setting_label,
    split_keys,
    title,
)

SUCCESS = {"flip": "attack_success_rate", "backdoor": "attack_success_rate"}
SUCCESS["untargeted"] = "accuracy_drop"


def heatmap(ax, cells: dict, attacks, defenses, success: bool) -> None:
    """Stable accuracy (or each attack's success) per attack x defense, mean ± CI95."""
    values = np.full((len(attacks), len(defenses)), np.nan)
    for i, a in enumerate(attacks):
        for j, d in enumerate(defenses):
            r = cells.get((a, d))
            metric = (SUCCESS.get(r["measure"]) if success else "accuracy") if r else None
            text = "–"
            if r and r["diverged"] == r["seeds"]:
                ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, color="0.75"))
                text = "diverged"
            elif metric and math.isfinite(r[f"{metric}_mean"]):
                values[i, j], ci = r[f"{metric}_mean"], r[f"{metric}_ci95"]
                text = f"{values[i, j]:.2f}" + (f"\n±{ci:.2f}" if math.isfinite(ci) else "")
                text += f"\n({r['diverged']} diverged)" if r["diverged"] else ""
            dark = math.isfinite(values[i, j]) and values[i, j] < 0.6
            ax.text(j, i, text, ha="center", va="center", fontsize=7, color="w" if dark else "k")
    image = ax.imshow(np.ma.masked_invalid(values), vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.grid(False)
    ax.set_xticks(range(len(defenses)), defenses, rotation=30, ha="right")
    ax.set_yticks(range(len(attacks)), attacks)
    ax.figure.colorbar(image, ax=ax, shrink=0.8)


def matrix_figure(run: tables.Run, table, rows):
    """Attacks x defenses heatmaps; a row of them per value of the other swept settings
    that vary within an attack (flips that come with the attack do not split it)."""
    names = tables.class_names(run.config.get("dataset", ""))
    attacks = list(dict.fromkeys(r["attack"] for r in rows))
    defenses = list(dict.fromkeys(r["defense"] for r in rows))
    other = split_keys(rows, tables.varying(rows, tables.group_keys()), "attack")
    other = [k for k in other if k != "defense"]
    combo = lambda r: tuple(str(r[k]) for k in other)
    combos = list(dict.fromkeys(combo(r) for r in rows))
    # Side by side while the grid is narrow; with many defenses the two panels stack.
    wide = len(defenses) > 6
    panel = ((1.0 if wide else 2.4) * len(defenses), 0.8 + 0.5 * len(attacks))  # inches
    grid = (2 * len(combos), 1) if wide else (len(combos), 2)
    size = (3 + panel[0] * grid[1], 1.4 + panel[1] * grid[0])
    fig, axes = plt.subplots(*grid, squeeze=False, layout="constrained", figsize=size)
    axes = axes.reshape(len(combos), 2)  # [combo, (accuracy, success)]
    for i, values in enumerate(combos):
        cells = {(r["attack"], r["defense"]): r for r in rows if combo(r) == values}
        for ax, success in zip(axes[i], (False, True)):
            heatmap(ax, cells, attacks, defenses, success)
        settings = ", ".join(setting_label(k, v, names) for k, v in zip(other, values))
        axes[i, 0].set_title(f"{settings + ': ' if settings else ''}stable test accuracy")
        axes[i, 1].set_title("each attack's success:\nASR (flips, backdoors) or accuracy drop")
    seeds = max(r["seeds"] for r in rows)
    what = "attacks x defenses" + (", mean ± 95% CI over seeds" if seeds > 1 else "")
    fig.suptitle(title(run, rows, what))
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
    colors = iter(COLORS * 100)
    for run, table, rows in zip(runs, tables_, rows_of):
        for row in rows:
            clean = tables.is_clean(row)
            style = {**CLEAN, "linestyle": next(dashes)} if clean else {"color": next(colors)}
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
