"""Figures on hand-made runs: they say what ran, show seeds as a mean with a band, set
clean runs apart, draw identical curves once, and keep legends off the data."""

import io

import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib.collections import PolyCollection
from matplotlib.ticker import MaxNLocator
from PIL import Image

from fedjax_poison.results import figures, report, tables

CONFIG = {
    "dataset": "fashion_mnist",
    "num_clients": 50,
    "clients_per_round": 5,
    "num_rounds": 4,
    "eval_every": 1,
    "data": {"source": "auto", "partition": "dirichlet", "dirichlet": {"alpha": 0.5}},
    "attack": {"name": "label_flip", "malicious_fraction": 0.5, "flips": "6:0"},
    "defense": {"name": "fedavg"},
    "selection": {"schedule": "always", "breakpoint": 2, "alpha": 0.5, "alpha_after": -1},
}


def build(settings, source_of, selections=None, diverged=(), accuracy_of=None):
    """A run of experiments with the given settings over rounds 1..4; the source recall of
    experiment e in round r is source_of(e, r); experiments in `diverged` diverge in round 3."""
    entries = [{"axes": dict(s), **s} for s in settings]
    rows = []
    for e in range(len(entries)):
        mine = []
        for r in range(1, 5):
            recall = [0.9] * 10
            recall[6] = source_of(e, r)
            accuracy = accuracy_of(e, r) if accuracy_of else 0.8
            row = {"round": r, "experiment": e, "accuracy": accuracy, "recall": recall}
            row.update(source_recall=recall[6], attack_success_rate=1 - recall[6])
            if e in diverged and r >= 3:
                row.update(diverged=True, diverged_round=3)
            mine.append(row)
        rows.append(mine)
    exps = report.with_twins(entries, CONFIG, rows)
    run = tables.Run("lf_run", CONFIG, exps, rows, "synthetic", 2, selections or {})
    table = tables.experiment_table(run)
    return run, table, tables.by_seed_table(table)


def sweep(fractions=(0.0, 0.5), seeds=(0, 1), **extra):
    return [{"malicious_fraction": f, "seed": s, **extra} for f in fractions for s in seeds]


def lines_of(ax):
    """The data lines of an axes (not the empty ones)."""
    return [line for line in ax.get_lines() if len(line.get_xdata())]


def test_the_title_says_what_ran():
    run, table, by_seed = build(sweep(), lambda e, r: 0.8 - 0.1 * e)
    fig = report.build_figures(run, table, by_seed)["curves"]
    title = " ".join(fig.get_suptitle().split())  # the title wraps
    assert "lf_run" not in title  # what ran, not the folder it ran in
    assert title.startswith("Test accuracy and source-class recall over rounds")
    for words in ("fashion_mnist (synthetic data)", "label_flip", "Shirt→T-shirt/top"):
        assert words in title
    assert "dirichlet partition (alpha 0.5)" in title and "50 clients (5 a round)" in title
    assert "defense fedavg" in title and "4 rounds" in title and "2 seeds" in title


def test_the_title_wraps_between_its_items():
    fig = plt.figure(figsize=(4, 3))  # 44 characters a line
    figures.suptitle(fig, "What\nfashion_mnist, IID partition, 50 clients (5 a round), 20 rounds")
    lines = fig.get_suptitle().split("\n")
    assert lines == ["What", "fashion_mnist, IID partition,", "50 clients (5 a round), 20 rounds"]
    plt.close(fig)


def test_accuracy_axes_fit_their_data_and_recall_axes_span_0_to_1():
    run, table, by_seed = build(sweep(), lambda e, r: 0.5, accuracy_of=lambda e, r: 0.86 - 0.01 * e)
    fig = report.build_figures(run, table, by_seed)["curves"]
    accuracy, recall = fig.axes[:2]
    low, high = accuracy.get_ylim()
    assert 0.6 < low < 0.83 and 0.86 < high <= 1.02  # 0.83 to 0.86 and their bands, not squeezed
    assert recall.get_ylim() == (-0.02, 1.02)
    plt.close(fig)


def test_a_swept_alpha_is_in_the_legend_not_the_title():
    settings = [
        {"malicious_fraction": 0.5, "seed": 0, "schedule": "availability", "alpha": [a, a]}
        for a in (0.0, 0.4)
    ]
    run, table, by_seed = build(settings, lambda e, r: 0.6 - 0.4 * e)
    fig = report.build_figures(run, table, by_seed)["recall_over_rounds"]
    title = " ".join(fig.get_suptitle().split())  # the title wraps
    assert "schedule availability" in title and "alpha 0.4" not in title
    labels = [h.get_label() for h in fig.legends[0].legend_handles]
    assert "alpha 0" in labels and "alpha 0.4" in labels


def test_figures_are_written_as_png_at_150_dpi_and_pdf_with_their_title_and_no_date():
    run, table, by_seed = build(sweep(), lambda e, r: 0.8 - 0.1 * e)
    fig = figures.curves_figure(run, table, by_seed)

    class Writer:
        files = {}

        def write_bytes(self, name, data):
            self.files[name] = data

    writer = Writer()
    assert figures.save(fig, "curves", writer) == ["curves.png", "curves.pdf"]
    png = Image.open(io.BytesIO(writer.files["curves.png"]))
    assert png.info["dpi"] == pytest.approx((150, 150), abs=0.05)
    assert png.text["Title"].startswith("Test accuracy") and "synthetic data" in png.text["Title"]
    assert writer.files["curves.pdf"].startswith(b"%PDF")
    first = dict(writer.files)
    figures.save(figures.curves_figure(run, table, by_seed), "curves", writer)
    assert writer.files == first  # the same run, the same bytes (no date in the PDF)


def test_seeds_are_one_mean_line_with_a_band_and_the_clean_run_is_grey_dashed():
    # clean 0.9; attacked seeds 0.4 and 0.6 -> mean 0.5
    run, table, by_seed = build(sweep(), lambda e, r: (0.9, 0.9, 0.4, 0.6)[e])
    fig = figures.curves_figure(run, table, by_seed)
    accuracy, recall = fig.axes
    clean, attacked = lines_of(recall)  # two lines, not four
    assert clean.get_linestyle() == "--" and clean.get_color() == "0.45"
    assert attacked.get_ydata().tolist() == pytest.approx([0.5] * 4)
    assert any(isinstance(c, PolyCollection) for c in recall.collections)  # the CI band
    labels = [h.get_label() for h in fig.legends[0].legend_handles]
    assert "0% malicious (no attack)" in labels and "50% malicious" in labels
    assert figures.BAND in labels
    assert all(ax.get_legend() is None for ax in fig.axes)  # outside the axes


def test_rounds_have_integer_ticks():
    run, table, by_seed = build(sweep(seeds=(0,)), lambda e, r: 0.5)
    fig = figures.curves_figure(run, table, by_seed)
    fig.canvas.draw()
    ax = fig.axes[0]
    assert isinstance(ax.xaxis.get_major_locator(), MaxNLocator)
    low, high = ax.get_xlim()
    ticks = [t for t in ax.get_xticks() if low <= t <= high]
    assert ticks and all(float(t).is_integer() for t in ticks)


def test_a_single_run_marks_the_rounds_with_malicious_clients():
    settings = sweep(seeds=(0,))
    run, table, by_seed = build(settings, lambda e, r: 0.5, selections={0: [], 1: [2, 4]})
    fig = figures.curves_figure(run, table, by_seed)
    marks = [line for line in lines_of(fig.axes[0]) if line.get_marker() == "|"]
    assert len(marks) == 1 and marks[0].get_xdata().tolist() == [2, 4]
    run, table, by_seed = build(settings, lambda e, r: 0.5)  # no records: no marks
    fig = figures.curves_figure(run, table, by_seed)
    assert not [line for line in lines_of(fig.axes[0]) if line.get_marker() == "|"]


def test_identical_clean_twins_are_drawn_once_and_breakpoints_sit_above_the_axes():
    settings = [
        {"malicious_fraction": f, "seed": 0, "schedule": s}
        for s in ("always", "early", "late")
        for f in (0.0, 0.5)
    ]
    # every clean run has the same curve; the attacked ones differ
    curve = lambda e, r: 0.9 if e % 2 == 0 else 0.1 * (e + r)
    run, table, by_seed = build(settings, curve)
    fig = report.build_figures(run, table, by_seed)["recall_over_rounds"]
    ax = fig.axes[0]
    styles = [line.get_linestyle() for line in lines_of(ax)]
    assert styles.count("--") == 1 and styles.count("-") == 3  # 6 groups, 4 distinct curves
    assert styles.count(":") == 1  # the breakpoint
    labels = [h.get_label() for h in fig.legends[0].legend_handles]
    assert "0% malicious (no attack) (the same for schedule always, early, late)" in labels
    assert not ax.texts  # nothing written over the curves
    (top,) = ax.child_axes
    assert [t.get_text() for t in top.get_xticklabels()] == ["breakpoint (round 2)"]


def test_diverged_seeds_are_left_out_and_said():
    run, table, by_seed = build(sweep(), lambda e, r: (0.9, 0.9, 0.4, 0.6)[e], diverged=(3,))
    fig = figures.curves_figure(run, table, by_seed)
    attacked = lines_of(fig.axes[1])[1]
    assert attacked.get_ydata().tolist() == pytest.approx([0.4] * 4)  # seed 1 left out
    labels = [h.get_label() for h in fig.legends[0].legend_handles]
    assert "50% malicious [1 of 2 seeds diverged]" in labels


def test_fraction_figure_puts_the_clean_twins_at_zero():
    settings = [{"malicious_fraction": 0.0, "seed": 0, "attack": "none", "flips": ""}]
    settings += [{"malicious_fraction": f, "seed": 0} for f in (0.2, 0.4)]
    run, table, by_seed = build(settings, lambda e, r: (0.9, 0.6, 0.3)[e])
    fig = report.build_figures(run, table, by_seed)["source_recall_vs_fraction"]
    (line,) = [line for line in lines_of(fig.axes[0]) if line.get_marker() == "o"]
    assert line.get_xdata().tolist() == [0.0, 0.2, 0.4]
    assert line.get_ydata().tolist() == pytest.approx([0.9, 0.6, 0.3])


def test_matrix_of_attacks_and_defenses_says_which_cell_diverged():
    settings = [
        {"attack": a, "defense": d, "seed": 0, "flips": "6:0" if a == "label_flip" else ""}
        for a in ("none", "label_flip", "sign_flip")
        for d in ("fedavg", "median")
    ]
    run, table, by_seed = build(settings, lambda e, r: 0.5, diverged=(5,))
    fig = report.build_figures(run, table, by_seed)["matrix"]
    accuracy = fig.axes[0]
    texts = [t.get_text() for t in accuracy.texts]
    assert texts.count("diverged") == 1 and texts.count("0.80") == 5
    assert [t.get_text() for t in accuracy.get_yticklabels()] == ["none", "label_flip", "sign_flip"]
    assert fig.get_suptitle().startswith("Attacks x defenses")
    image = accuracy.images[0].get_array()
    assert np.ma.is_masked(image[2, 1]) and image[0, 0] == pytest.approx(0.8)


def matrix_of(defenses, attacks=("none", "label_flip")):
    """The matrix figure of attacks x defenses (one seed) and its heatmap panels."""
    settings = [
        {"attack": a, "defense": d, "seed": 0, "flips": "6:0" if a == "label_flip" else ""}
        for a in attacks
        for d in defenses
    ]
    run, table, by_seed = build(settings, lambda e, r: 0.5)
    fig = report.build_figures(run, table, by_seed)["matrix"]
    return fig, [ax for ax in fig.axes if ax.images]


def test_a_matrix_of_many_defenses_stacks_its_panels():
    names = ("fedavg", "median", "krum", "pca", "flame", "dnc", "signguard", "nnm+krum")
    fig, panels = matrix_of(names)
    accuracy, success = panels[:2]
    assert panels[2].get_position().y1 < accuracy.get_position().y0  # two panels a row
    width, _ = fig.get_size_inches()
    assert width * figures.DPI <= 2000
    assert [t.get_text() for t in success.get_xticklabels()] == list(names)


def test_a_matrix_of_sixteen_defenses_gives_each_panel_a_row_of_its_own():
    names = tuple(f"rule{i}" for i in range(16))
    fig, panels = matrix_of(names)
    fig.canvas.draw()
    assert panels[1].get_position().y1 < panels[0].get_position().y0  # one panel a row
    width = panels[0].get_window_extent().width / fig.dpi / len(names)
    assert width >= 0.4  # inches a cell: room for its two lines of text
    assert fig.get_figwidth() * figures.DPI <= 2000
    assert any(t.get_text().startswith("0.80") for t in panels[0].texts)
    fig, panels = matrix_of(tuple(f"rule{i}" for i in range(48)))  # colours only
    assert fig.get_figwidth() * figures.DPI <= 2000
    assert not [t for ax in panels for t in ax.texts]


def test_an_untargeted_attack_is_shown_by_its_accuracy():
    settings = sweep(seeds=(0,), attack="sign_flip", flips="")
    run, table, by_seed = build(settings, lambda e, r: 0.5)
    built = report.build_figures(run, table, by_seed)
    assert [ax.get_ylabel() for ax in built["curves"].axes] == ["test accuracy"]
    assert [ax.get_ylabel() for ax in built["source_recall_vs_fraction"].axes] == ["test accuracy"]


def matrix_settings(defenses=("fedavg", "median"), seeds=(0, 1)):
    return [
        {"attack": a, "defense": d, "seed": s, "flips": "6:0" if a == "label_flip" else ""}
        | {"malicious_fraction": 0.0 if a == "none" else 0.5}
        for a in ("none", "label_flip", "sign_flip")
        for d in defenses
        for s in seeds
    ]


def test_matrix_heatmaps_one_panel_per_measure_on_scales_fit_to_their_data():
    run, table, by_seed = build(
        matrix_settings(), lambda e, r: 0.9 - 0.05 * e, accuracy_of=lambda e, r: 0.8 + 0.01 * e
    )
    fig = report.build_figures(run, table, by_seed)["matrix"]
    panels = [ax for ax in fig.axes if ax.images]
    assert [ax.get_title() for ax in panels] == [
        "test accuracy",
        "attack success rate (flips, backdoors)",
        "success rate − clean twin (paired by seed)",
        "accuracy − clean twin (paired by seed)",
    ]
    low, high = panels[0].images[0].get_clim()
    assert 0.75 < low <= 0.8 and 0.91 <= high < 0.95  # accuracies 0.80 to 0.91, not 0 to 1
    for ax in panels[2:]:  # differences: a diverging scale centred on no difference
        low, high = ax.images[0].get_clim()
        assert low == -high and ax.images[0].get_cmap().name in ("RdBu", "RdBu_r")
    assert fig.get_figwidth() * figures.DPI <= 2000


def test_curves_put_each_attack_beside_the_clean_twin_of_its_own_defense():
    run, table, by_seed = build(matrix_settings(), lambda e, r: 0.9 - 0.05 * e)
    fig = figures.curves_figure(run, table, by_seed)
    exps = run.experiments
    clean = {
        d: np.mean(
            [
                0.9 - 0.05 * e
                for e, x in enumerate(exps)
                if (x["attack"], x["defense"]) == ("none", d)
            ]
        )
        for d in ("fedavg", "median")
    }
    rows = np.asarray(fig.axes).reshape(2, 2)
    for (accuracy, recall), defense in zip(rows, ("fedavg", "median")):
        assert accuracy.get_title(loc="left") == f"defense {defense}"
        dashed = [line for line in lines_of(recall) if line.get_linestyle() == "--"]
        assert len(dashed) == 1  # its own defense's clean run, not every clean run
        assert dashed[0].get_ydata().tolist() == pytest.approx([clean[defense]] * 4)


def test_every_legend_line_looks_different():
    pairs = [f"{s}:{t}" for s in range(4) for t in range(4) if s != t][:12]
    settings = [{"malicious_fraction": 0.5, "seed": 0, "flips": p} for p in pairs]
    run, table, by_seed = build(settings, lambda e, r: 0.1 * (e % 10))
    fig = figures.curves_figure(run, table, by_seed)
    handles = [h for h in fig.legends[0].legend_handles if h.get_linestyle() != "None"]
    styles = {(str(h.get_color()), str(h.get_linestyle())) for h in handles}
    assert len(handles) == 12 and len(styles) == 12


def test_one_seed_is_not_called_a_mean():
    run, table, by_seed = build(sweep(fractions=(0.5,), seeds=(0,)), lambda e, r: 0.5)
    fig = figures.curves_figure(run, table, by_seed)
    labels = [h.get_label() for h in fig.legends[0].legend_handles]
    assert "1 seed" in labels and not any("mean" in label for label in labels)
    run, table, by_seed = build(sweep(fractions=(0.5,)), lambda e, r: 0.5)
    texts = figures.curves_figure(run, table, by_seed).legends[0].texts
    assert "mean over 2 seeds" in [t.get_text() for t in texts]


def test_an_untargeted_attack_gets_no_success_panel():
    settings = [{"attack": "none", "malicious_fraction": 0.0, "seed": 0, "flips": ""}]
    settings += [
        {
            "attack": a,
            "malicious_fraction": f,
            "seed": 0,
            "flips": "6:0" if a == "label_flip" else "",
        }
        for a in ("label_flip", "sign_flip")
        for f in (0.2, 0.5)
    ]
    run, table, by_seed = build(settings, lambda e, r: 0.5)
    fig = figures.curves_figure(run, table, by_seed)
    rows = np.asarray(fig.axes).reshape(2, 2)
    titles = [ax.get_title(loc="left") for ax in rows[:, 0]]
    assert titles[0].startswith("label_flip") and titles[1].startswith("sign_flip")
    assert lines_of(rows[0, 1]) and not lines_of(rows[1, 1])
    assert "no success measure" in rows[1, 1].texts[0].get_text()
