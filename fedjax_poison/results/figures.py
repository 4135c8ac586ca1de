"""A run's figures, each as PNG (150 dpi) and PDF, titled with what ran: the dataset,
partition, clients, the settings every line shares, rounds and seeds (never a folder).

    curves                     accuracy and the attack's measure over rounds: one line per
                               attacked setting (colour) beside its own clean twin (dashed),
                               panel rows for the other swept settings; an untargeted
                               attack gets no success panel; a run of one attack marks the
                               rounds a malicious client trained
    source_recall_vs_fraction  stable measures vs the malicious fraction (when it varies)
    recall_over_rounds         source recall over rounds (when schedule, alpha or breakpoint
                               varies), breakpoints labelled above the axes
    matrix                     attacks x defenses (matrix_figures): a heatmap per measure

Settings are named as their sweep axis says (config/sweeps.AXES); the title gives those
every line shares, the legend and panel titles the others. Seeds are one line, their mean
("mean over n seeds" from two on), with a band (or error bars) for the 95% confidence
interval of the mean (Student t). Clean runs are dashed; identical curves are drawn once;
no two lines of a legend share both colour and line style. Diverged experiments are left
out, and legends say how many. Legends sit outside the axes.
"""

import io
import math
import textwrap

import matplotlib

matplotlib.use("Agg")  # files only; never a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from fedjax_poison.config import sweeps  # noqa: E402
from fedjax_poison.results import stats, tables  # noqa: E402

DPI = 150
STYLE = {
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "font.size": 9,
    "axes.titlesize": 9,
    "figure.titlesize": 10,
    "legend.fontsize": 8,
    "legend.frameon": False,
    "lines.linewidth": 1.6,
}
CLEAN = {"color": "0.45", "linestyle": "--"}
COLORS = [f"C{i}" for i in (0, 1, 2, 3, 4, 5, 6, 8, 9)]  # tab10 without its grey
BAND = "band: 95% CI of the mean over seeds"
LABELS = {
    "accuracy": "test accuracy",
    "source_recall": "source-class recall",
    "attack_success_rate": "attack success rate",
    "accuracy_drop": "accuracy drop vs. clean",
}


def setting_label(key: str, value, names) -> str:
    """A setting in words, as its axis puts them: '30% malicious', 'Shirt→T-shirt/top',
    'alpha 0→0.6', else '<axis> <cell>'; a run's name as it is."""
    text = tables.format_setting(key, value)
    axis = sweeps.AXES.get(key)
    if axis is None:
        return text
    return axis.words(text, names) if axis.words else f"{key} {text}"


def hue_order() -> list[str]:
    """The settings figures colour lines by, the first that varies: by their axis's hue."""
    return sorted(tables.group_keys(), key=lambda k: sweeps.AXES[k].hue)


def group_label(row: dict, keys, names) -> str:
    """The settings `keys` of a group in words, '(no attack)' for a clean one."""
    text = ", ".join(setting_label(k, row[k], names) for k in keys)
    if tables.is_clean(row) and "no attack" not in text:
        text = f"{text} (no attack)" if text else "no attack"
    if row["diverged"] == row["seeds"]:
        return f"{text} [diverged]" if row["seeds"] == 1 else f"{text} [all seeds diverged]"
    return text + (
        f" [{row['diverged']} of {row['seeds']} seeds diverged]" if row["diverged"] else ""
    )


def seeds_words(n: int) -> str:
    """'mean over 3 seeds', or '1 seed' (no mean to speak of)."""
    return f"mean over {n} seeds" if n > 1 else "1 seed"


def title(run: tables.Run, rows, what: str) -> str:
    """'<what>' over '<dataset> (synthetic data), <partition>, <clients>, <settings all rows
    share>, <rounds>, <n> seeds': what ran, never the folder it ran in.

    A shared setting is said where it changes the (first attacked) experiments and is not
    its axis's quiet value (schedule 'always')."""
    c = run.config
    names = tables.class_names(c.get("dataset", ""))
    dataset = c.get("dataset", "?")
    if run.data_source == "synthetic":
        dataset += " (synthetic data)"
    attacked = [r for r in rows if not tables.is_clean(r)] or rows  # clean ones say so
    first = attacked[0]
    varying = set(tables.varying(attacked, tables.group_keys()))
    recorded = run.experiments[first["experiments"][0]]
    shown = [
        k
        for k in tables.group_keys()
        if k not in varying
        and sweeps.applies(k, recorded)
        and tables.format_setting(k, first[k]) != sweeps.AXES[k].quiet
    ]
    clients = ""
    if c.get("num_clients"):
        clients = f"{c['num_clients']} clients ({c.get('clients_per_round', '?')} a round)"
    parts = [dataset, tables.partition_words(c), clients]
    parts += [setting_label(k, first[k], names) for k in shown]
    done = max((r["round"] for rs in run.rows for r in rs), default=0)
    parts.append(f"{c.get('num_rounds') or done} rounds")
    seeds = max(r["seeds"] for r in rows)
    parts.append(f"{seeds} seed{'s' if seeds > 1 else ''}")
    return what[0].upper() + what[1:] + "\n" + ", ".join(p for p in parts if p)


def used(table, row) -> list[int]:
    """The experiments of a group that did not diverge."""
    return [e for e in row["experiments"] if table[e]["diverged"] is None]


def flips_of(run: tables.Run, row: dict):
    """A group's flip pairs; for a clean group without flips, those of what it is twin of."""
    pairs = tables.parse_flips(row["flips"])
    mine = set(row["experiments"])
    for exp in run.experiments if not pairs else ():
        if exp.get("clean_twin") in mine and exp["flips"]:
            return tables.parse_flips(exp["flips"])
    return pairs


def group_curve(run, table, row, metric, pairs=()) -> stats.Curve:
    """Mean and CI95 of a metric over rounds, over a group's seeds that did not diverge; a
    group without flips is read on `pairs`, else on those of what it is the twin of."""
    pairs = tables.parse_flips(row["flips"]) or pairs or flips_of(run, row)
    series = [tables.series(run.rows[e], metric, pairs) for e in used(table, row)]
    return stats.mean_curve(series)


def draw_curve(ax, curve: stats.Curve, style: dict, band: bool = True):
    """The mean line (a dot for one evaluation) and its CI band where there is one."""
    ok = np.isfinite(curve.mean)
    if not ok.any():
        return
    x, y, ci = curve.rounds[ok], curve.mean[ok], curve.ci95[ok]
    (line,) = ax.plot(x, y, marker="o" if len(x) == 1 else None, **style)
    band = np.isfinite(ci) & band
    if band.any():
        color = line.get_color()
        ax.fill_between(x[band], (y - ci)[band], (y + ci)[band], color=color, alpha=0.15, lw=0)


def same_curve(a: stats.Curve, b: stats.Curve) -> bool:
    """Whether two curves are the same (rounds, and means within 1e-9)."""
    return np.array_equal(a.rounds, b.rounds) and np.allclose(
        a.mean, b.mean, atol=1e-9, rtol=0, equal_nan=True
    )


def format_axes(ax, metric: str, rounds: bool = True) -> None:
    """Metric label, integer round ticks; recalls and rates on [0, 1], accuracies on the
    range of what was drawn (0.80 and 0.85 apart, not one line), within [0, 1]."""
    ax.set_ylabel(LABELS.get(metric, metric))
    lo, hi = ax.dataLim.intervaly if ax.has_data() else (np.inf, -np.inf)
    if metric.endswith("accuracy") and np.isfinite(lo) and np.isfinite(hi):
        pad = 0.1 * max(hi - lo, 0.05)
        ax.set_ylim(max(-0.02, lo - pad), min(1.02, hi + pad))
    else:
        ax.set_ylim(-0.02, 1.02)
    if rounds:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("round")


LINESTYLES = ["-", (0, (5, 1.5)), (0, (1, 1.2)), (0, (6, 1.5, 1, 1.5))]


def line_style(i: int) -> dict:
    """The i-th line's style: 9 colours, then the same colours in other line styles, so
    that no two lines of a legend look alike."""
    return {"color": COLORS[i % len(COLORS)], "linestyle": LINESTYLES[i // len(COLORS) % 4]}


def hue_colors(rows, hue) -> dict:
    """A style per value of the hue setting (a sequential colour for numbers)."""
    values = list(dict.fromkeys(str(r[hue]) for r in rows if not tables.is_clean(r))) if hue else []
    numeric = hue is not None and sweeps.AXES[hue].ordered
    cmap = plt.get_cmap("viridis")
    at = lambda i: (
        {"color": cmap(0.1 + 0.75 * i / max(len(values) - 1, 1))} if numeric else line_style(i)
    )
    return {v: at(i) for i, v in enumerate(values)} or {"": line_style(0)}


def style_of(row, hue, colors) -> dict:
    if tables.is_clean(row):
        return dict(CLEAN)
    return dict(colors.get(str(row[hue]) if hue else "", {"color": COLORS[0]}))


def panel_metrics(rows) -> list[str]:
    """accuracy; source recall where something flips; attack success where a backdoor is."""
    metrics = ["accuracy"]
    metrics += ["source_recall"] if any(r["flips"] for r in rows) else []
    return metrics + (
        ["attack_success_rate"] if any(r["measure"] == "backdoor" for r in rows) else []
    )


def legend(fig, handles, ncol=3) -> None:
    """One legend for the figure, below the axes, in as many columns as its width holds."""
    width = int(fig.get_figwidth() * 15)  # characters of the legend's font in a row
    for h in handles:
        h.set_label("\n".join(textwrap.wrap(h.get_label(), width - 8)))
    longest = max(len(line) for h in handles for line in h.get_label().split("\n"))
    ncol = max(1, min(ncol, len(handles), width // (longest + 8)))
    fig.legend(handles=handles, loc="outside lower center", ncol=ncol)


def split_keys(rows, keys, by):
    """The keys that vary within a value of `by` (flips that come with the attack do not)."""
    values = {str(r[by]) for r in rows} if by else {None}
    within = lambda k: any(
        len({str(r[k]) for r in rows if not by or str(r[by]) == v}) > 1 for v in values
    )
    return [k for k in keys if k != by and within(k)]


def extra_handles(rows, marks=None) -> list:
    """Legend entries for the band and the selection marks (rounds), where there are any."""
    out = [Patch(color="0.5", alpha=0.3, label=BAND)] if any(r["seeds"] > 1 for r in rows) else []
    if marks is None:
        return out
    if not marks:
        return out + [Line2D([], [], ls="none", label="no malicious client was ever selected")]
    label = "rounds in which a malicious client was selected"
    return out + [Line2D([], [], color="C3", marker="|", ls="none", label=label)]


def mark_selections(axes, rounds) -> None:
    """Ticks on the x axis at the given rounds."""
    for ax in axes:
        ax.plot(
            rounds,
            np.zeros(len(rounds)),
            ls="none",
            marker="|",
            ms=9,
            color="C3",
            transform=ax.get_xaxis_transform(),
            clip_on=False,
        )


def selection_rounds(run, table, rows):
    """The rounds to mark: those of the one attacked experiment, if the run has one."""
    attacked = [e for r in rows if not tables.is_clean(r) for e in used(table, r)]
    if len(attacked) != 1 or not run.selections:
        return None
    return run.selections.get(attacked[0])


def hue_handles(rows, hue, colors, names) -> list:
    """One legend entry per value of the hue setting; one for each group left out."""
    handles = {}
    for r in rows:
        key = (str(r[hue]) if hue else "", tables.is_clean(r))
        if key not in handles:
            label = setting_label(hue, r[hue], names) if hue else seeds_words(r["seeds"])
            label += " (no attack)" if tables.is_clean(r) and "no attack" not in label else ""
            handles[key] = Line2D([], [], label=label, **style_of(r, hue, colors))
    keys = tables.varying(rows, tables.group_keys())
    keys = [k for k in keys if k == hue or k in split_keys(rows, keys, hue)]
    left_out = [group_label(r, keys, names) for r in rows if r["diverged"]]
    return list(handles.values()) + [Line2D([], [], ls="none", label=t) for t in left_out]


def twin_group(run: tables.Run, rows, row) -> dict | None:
    """The group that holds the clean twins of an attacked group's experiments (None
    without one)."""
    twins = {run.experiments[e].get("clean_twin") for e in row["experiments"]} - {None}
    return next((r for r in rows if twins and twins <= set(r["experiments"])), None)


def measured(metric: str, members) -> bool:
    """Whether a panel of `metric` means something for these attacked groups: source
    recall where one flips, the attack success rate where one is targeted."""
    if metric == "source_recall":
        return any(r["flips"] for r in members)
    if metric == "attack_success_rate":
        return any(r["measure"] in ("flip", "backdoor") for r in members)
    return True


def curves_figure(run: tables.Run, table, rows):
    """Accuracy and the attack's measure over rounds: each attacked group (colour by the
    first swept setting of hue_order) beside its own clean twin (dashed), a row of panels
    per value of the other settings; untargeted attacks get no success panel."""
    names = tables.class_names(run.config.get("dataset", ""))
    attacked = [r for r in rows if not tables.is_clean(r)]
    lines = attacked or rows  # a run without attack: its clean groups are the lines
    metrics = panel_metrics(rows)
    keys = tables.varying(lines, tables.group_keys()) or tables.varying(rows, tables.group_keys())
    hue = next((k for k in hue_order() if k in keys), None)
    facet_keys = split_keys(lines, keys, hue)
    facet = lambda r: tuple(str(r[k]) for k in facet_keys)
    facets = list(dict.fromkeys(facet(r) for r in lines))
    fig, axes = plt.subplots(
        len(facets), len(metrics), squeeze=False, sharex=True, layout="constrained",
        figsize=(1.5 + 3.6 * len(metrics), 1.8 + 2.4 * len(facets)),
    )  # fmt: skip
    colors, matched = hue_colors(rows, hue), False
    for i, values in enumerate(facets):
        members = [r for r in lines if facet(r) == values]
        twins = {}  # clean twins by their first experiment: grey and dashed, or dashed in
        for row in members:  # their attacked group's colour where several twins share a panel
            twin = twin_group(run, rows, row) if attacked else None
            if twin is not None:
                style = {**style_of(row, hue, colors), "linestyle": "--", "alpha": 0.8}
                twins.setdefault(twin["experiments"][0], [twin, style, row, 0])[3] += 1
        for entry in twins.values():
            if len(twins) == 1 or entry[3] > 1:
                entry[1] = dict(CLEAN)
            matched = matched or entry[1] != CLEAN
        for ax, metric in zip(axes[i], metrics):
            if not measured(metric, members):
                ax.text(0.5, 0.5, "untargeted attack:\nno success measure", ha="center",
                        va="center", transform=ax.transAxes, color="0.4")  # fmt: skip
                format_axes(ax, metric)
                continue
            for twin, style, row, _ in twins.values():
                pairs = tables.parse_flips(row["flips"])
                draw_curve(ax, group_curve(run, table, twin, metric, pairs), style, band=False)
            for row in members:
                draw_curve(ax, group_curve(run, table, row, metric), style_of(row, hue, colors))
            format_axes(ax, metric)
        if facet_keys:
            label = ", ".join(setting_label(k, members[0][k], names) for k in facet_keys)
            axes[i, 0].set_title(label, loc="left")
    marks = selection_rounds(run, table, rows)
    if marks:
        mark_selections(axes.flat, marks)
    handles = hue_handles(rows, hue, colors, names)
    if matched:
        note = "dashed, in a line's colour: its clean twin (no attack, all else the same)"
        handles.append(Line2D([], [], color="0.3", linestyle="--", label=note))
    legend(fig, handles + extra_handles(rows, marks))
    suptitle(fig, title(run, rows, " and ".join(LABELS[m] for m in metrics) + " over rounds"))
    return fig


def measure_of(rows) -> str:
    """The stable measure that shows an attack's effect in these rows."""
    if any(r["flips"] for r in rows):
        return "source_recall"
    return "attack_success_rate" if any(r["measure"] == "backdoor" for r in rows) else "accuracy"


def stable_spread(run, table, exps, metric, pairs) -> stats.Spread:
    """The stable value of a metric over experiments that did not diverge (see stats)."""
    values = [
        stats.tail_mean(tables.series(run.rows[e], metric, pairs), run.window)
        for e in exps
        if table[e]["diverged"] is None
    ]
    return stats.spread(values)


def fraction_lines(run, rows) -> list[tuple[dict, list]]:
    """[(the row naming a line, [(fraction, experiments)])]: attacked groups joined by
    their other swept settings, with their clean twins at fraction 0 where the line has no
    clean point of its own; clean groups no line took are lines of their own."""
    attacked = [r for r in rows if not tables.is_clean(r)]
    keys = tables.varying(attacked, tables.group_keys())
    keys = [k for k in keys if k != "malicious_fraction"]
    key = lambda r: tuple(str(r[k]) for k in keys)
    lines: dict[tuple, list] = {}
    for row in attacked + [r for r in rows if tables.is_clean(r)]:
        lines.setdefault(key(row), []).append(row)
    out, taken = [], set()
    for members in lines.values():
        points = [(float(r["malicious_fraction"]), r["experiments"]) for r in members]
        twins = {run.experiments[e].get("clean_twin") for r in members for e in r["experiments"]}
        twins.discard(None)
        if twins and not any(f == 0 for f, _ in points):
            points.append((0.0, sorted(twins)))
            taken |= twins
        out.append((members[0], sorted(points, key=lambda p: p[0])))
    return [
        (r, p) for r, p in out if not (tables.is_clean(r) and {e for _, x in p for e in x} <= taken)
    ]


def fraction_figure(run: tables.Run, table, rows):
    """Stable source recall (or the attack's measure) and accuracy vs malicious fraction,
    a line per other swept setting, error bars the CI95 over seeds."""
    names = tables.class_names(run.config.get("dataset", ""))
    keys = tables.varying([r for r in rows if not tables.is_clean(r)], tables.group_keys())
    keys = [k for k in keys if k != "malicious_fraction"]
    metrics = list(dict.fromkeys([measure_of(rows), "accuracy"]))
    fig, axes = plt.subplots(1, len(metrics), figsize=(1 + 4.5 * len(metrics), 4.4), squeeze=False,
                             layout="constrained")  # fmt: skip
    handles = []
    for i, (first, points) in enumerate(fraction_lines(run, rows)):
        style = dict(CLEAN) if tables.is_clean(first) else line_style(i)
        pairs = flips_of(run, first)
        for ax, metric in zip(axes[0], metrics):
            spreads = [stable_spread(run, table, exps, metric, pairs) for _, exps in points]
            yerr = [0 if math.isnan(s.ci95) else s.ci95 for s in spreads]
            x = [f for f, _ in points]
            ax.errorbar(x, [s.mean for s in spreads], yerr=yerr, marker="o", capsize=3, **style)
            ax.set_xlabel("malicious fraction of the clients")
            format_axes(ax, metric, rounds=False)
        label = group_label(first, keys, names) or seeds_words(first["seeds"])
        handles.append(Line2D([], [], marker="o", label=label, **style))
    note = "error bars: 95% CI of the mean over seeds"
    handles += [Line2D([], [], ls="none", label=note)] if any(r["seeds"] > 1 for r in rows) else []
    legend(fig, handles)
    last = "the last evaluation" if run.window == 1 else f"the last {run.window} evaluations"
    what = f"stable measures (mean of {last}) vs malicious fraction"
    suptitle(fig, title(run, rows, what))
    return fig


def uses_breakpoint(row: dict) -> bool:
    """Whether a group's selection changes at its breakpoint round."""
    return row["schedule"] in ("early", "late") or (
        row["schedule"] == "availability" and "/" in str(row["alpha"])
    )


def merged_label(rows, keys, names) -> str:
    """The label of groups whose curves are the same: their common settings, then the
    values of the others ('the same for schedule always, early')."""
    common = [k for k in keys if len({str(r[k]) for r in rows}) == 1]
    text = group_label(rows[0], common, names)
    values = lambda k: ", ".join(dict.fromkeys(tables.format_setting(k, r[k]) for r in rows))
    differ = [f"{k} {values(k)}" for k in keys if k not in common]
    return text + (f" (the same for {'; '.join(differ)})" if differ else "")


def merged_lines(entries, keys, names) -> list[tuple]:
    """(label, style, curves) per distinct curve of the (row, style, curves) entries;
    groups with the same curves are drawn once, with the first one's style."""
    out: list[list] = []
    for row, style, curves in entries:
        same = [o for o in out if all(same_curve(o[2][m], c) for m, c in curves.items())]
        if same:
            same[0][0].append(row)
        else:
            out.append([[row], style, curves])
    return [(merged_label(rows, keys, names), style, curves) for rows, style, curves in out]


def draw_lines(axes, metrics, lines) -> list:
    """Each [label, style, curves] on the axes of its metrics; their legend handles.

    Lines drawn first are drawn wider (3 points down to 1.6), so that where two runs follow
    the same path (a schedule that attacks early, then not) the one beneath still shows."""
    widths = np.linspace(3.0, 1.6, len(lines)) if len(lines) > 1 else [1.6]
    styles = [{"linewidth": w, **style} for (_, style, _), w in zip(lines, widths)]
    for (_, _, curves), style in zip(lines, styles):
        for ax, m in zip(axes, metrics):
            draw_curve(ax, curves[m], style)
    return [Line2D([], [], label=label, **style) for (label, _, _), style in zip(lines, styles)]


def rounds_figure(run: tables.Run, table, rows):
    """The attack's measure over rounds, a line per group; breakpoints above the axes."""
    names = tables.class_names(run.config.get("dataset", ""))
    metric, keys = measure_of(rows), tables.varying(rows, tables.group_keys())
    fig, ax = plt.subplots(figsize=(9, 4.6), layout="constrained")
    entries = []
    for i, row in enumerate(rows):
        style = dict(CLEAN) if tables.is_clean(row) else line_style(i)
        curves = {metric: group_curve(run, table, row, metric)}
        entries.append((row, style, curves))
    handles = draw_lines([ax], [metric], merged_lines(entries, keys, names))
    format_axes(ax, metric)
    breakpoints = sorted({int(r["breakpoint"]) for r in rows if uses_breakpoint(r)})
    for b in breakpoints:
        ax.axvline(b, color="black", linestyle=":", linewidth=1)
    if breakpoints:
        top = ax.secondary_xaxis("top")
        top.set_xticks(breakpoints, [f"breakpoint (round {b})" for b in breakpoints])
    legend(fig, handles + extra_handles(rows), ncol=2)
    suptitle(fig, title(run, rows, f"{LABELS[metric]} over rounds"))
    return fig


def suptitle(fig, text: str) -> None:
    """The figure's title, each line wrapped to the figure's width between its
    comma-separated items ("20 rounds" stays on one line), inside an item only where it
    alone is too wide."""
    width = max(40, int(fig.get_figwidth() * 11))  # characters of the title's font
    fig.suptitle("\n".join(w for line in text.split("\n") for w in wrap_items(line, width)))


def wrap_items(line: str, width: int) -> list[str]:
    """`line` in lines of at most `width` characters, broken after its ', ' separators."""
    lines: list[str] = []
    for item in line.split(", "):
        if lines and len(lines[-1]) + 2 + len(item) <= width:
            lines[-1] += ", " + item
            continue
        if lines:
            lines[-1] += ","
        lines += textwrap.wrap(item, width, break_on_hyphens=False) or [""]
    return lines or [""]


def save(fig, name: str, writer) -> list[str]:
    """Writes `name`.png (150 dpi) and `name`.pdf through writer.write_bytes; closes fig."""
    files = []
    meta = {"Title": fig.get_suptitle()}
    for ext in ("png", "pdf"):
        buffer = io.BytesIO()
        dated = {"CreationDate": None} if ext == "pdf" else {}  # the same run, the same bytes
        with plt.style.context(STYLE):
            fig.savefig(buffer, format=ext, dpi=DPI, metadata={**meta, **dated})
        writer.write_bytes(f"{name}.{ext}", buffer.getvalue())
        files.append(f"{name}.{ext}")
    plt.close(fig)
    return files
