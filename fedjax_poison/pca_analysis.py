"""The paper's offline defense analysis, automated: PCA scatter, clusters, verdicts, scores.

    python -m fedjax_poison.pca_analysis --workdir=runs/fmnist [--experiment=0] [--rounds=11:200]

Reads the feature rows a run with `save_features=True` left in `workdir/features/`
(each selected client's change of the attacked class's output row, per round), pools
the rounds of the window (numbered from 1, as everywhere; the paper's code uses its rounds
10 to 199 counted from 0, i.e. 11 to 200), and writes `pca_scatter.png` and `.pdf` (honest
vs malicious marked, as in the paper's figure), `pca_verdicts.csv` (one line per client)
and `pca_analysis.json` (cluster purity, precision and recall of the verdicts per row and
per client) into the run's workdir, under its lock and in its manifest. The clustering
and the choice of the malicious cluster are the PCA defense's own. A user's error (no
features, a window that is not first:last, a folder that is not a run's, a damaged features
file) ends in one line and exit status 2.
"""

import glob
import os
import sys
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from fedjax_poison import errors, files, signals
from fedjax_poison.defenses import base, source_pca
from fedjax_poison.results import figures
from fedjax_poison.runner.workdir import Workdir


class AnalysisError(errors.UserError, ValueError):
    """The analysis cannot run on what it was given; the message says what to change."""


def parse_rounds(text: str) -> tuple[int, int]:
    """'first:last' (or 'first:', to the end) as two rounds numbered from 1."""
    first, colon, last = text.partition(":")
    try:
        window = int(first), int(last) if last.strip() else 10**9
    except ValueError:
        window = None
    if not colon or window is None or not 1 <= window[0] <= window[1]:
        raise AnalysisError(
            f"--rounds={files.show(text)} is not a window first:last of rounds from 1 with "
            "first <= last, e.g. --rounds=11:200"
        )
    return window


def load_features(workdir: str, experiment: int = 0) -> dict:
    """Rows of one experiment pooled over rounds and clients: each value [m] or [m, F]."""
    folder = os.path.join(workdir, "features")
    paths = sorted(glob.glob(os.path.join(glob.escape(folder), "r*_e*.npz")))
    if not paths:
        raise AnalysisError(
            f"no features in {files.show(folder)}: run with --config.save_features=True"
        )
    parts = []
    for path in paths:
        try:
            with np.load(path, allow_pickle=False) as f:
                hit = np.flatnonzero(f["experiment"] == experiment)
                if hit.size:
                    g, k = hit[0], f["client"].shape[-1]
                    parts.append(
                        {
                            "round": np.repeat(f["round"], k),
                            "client": f["client"][g].ravel(),
                            "malicious": f["malicious"][g].ravel(),
                            "flagged": f["flagged"][g].ravel(),
                            "sign": f["sign"][g].ravel(),
                            "features": f["features"][g].reshape(-1, f["features"].shape[-1]),
                        }
                    )
        except (OSError, ValueError, EOFError, KeyError, IndexError, zipfile.BadZipFile) as e:
            raise AnalysisError(
                f"{files.show(path)} cannot be read ({type(e).__name__}): the file was "
                "changed or damaged; restore or delete it"
            ) from None
    if not parts:
        raise AnalysisError(
            f"experiment {experiment} has no features in {files.show(folder)}: name another "
            "--experiment"
        )
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}


def load_rounds(workdir: str) -> dict[int, dict]:
    """Every experiment's recorded rounds, by experiment: round [R], client, malicious,
    flagged [R, k], sign [R, k], features and target [R, k, F] (the source and target
    rows' changes over each update's norm), global_rows [R, 2, F] (the global model's
    source and target rows before the round), rounds in order."""
    folder = os.path.join(workdir, "features")
    paths = sorted(glob.glob(os.path.join(glob.escape(folder), "r*_e*.npz")))
    if not paths:
        raise AnalysisError(
            f"no features in {files.show(folder)}: run with --config.save_features=True"
        )
    keys = ("client", "malicious", "flagged", "sign", "features", "target", "global_rows")
    parts: dict[int, list[dict]] = {}
    for path in paths:
        try:
            with np.load(path, allow_pickle=False) as f:
                for g, e in enumerate(f["experiment"]):
                    part = {key: f[key][g] for key in keys}
                    parts.setdefault(int(e), []).append({"round": f["round"], **part})
        except (OSError, ValueError, EOFError, KeyError, IndexError, zipfile.BadZipFile) as e:
            raise AnalysisError(
                f"{files.show(path)} cannot be read ({type(e).__name__}): the file was "
                "changed or damaged, or written before targets were recorded; run again"
            ) from None
    out = {}
    for e, chunks in parts.items():
        joined = {key: np.concatenate([c[key] for c in chunks]) for key in chunks[0]}
        order = np.argsort(joined["round"], kind="stable")
        out[e] = {key: value[order] for key, value in joined.items()}
    return out


def replay(runs: list[dict], **pca_fields) -> list[np.ndarray]:
    """The PCA defense's flags [R, k] on each experiment's recorded rounds (`load_rounds`;
    all of one run, same shapes), round after round from round 1, without training: a
    variant of the rule is judged on the rows a run saw. The rule sees two classes, 0 the
    source and 1 the target, and rows already scaled by each update's norm; `pca_fields`
    are the `defense.pca` block's fields (source_class 0 by default; -1 judges both rows)."""
    stack = lambda key, dtype: jnp.asarray(np.stack([r[key] for r in runs]), dtype)
    features = jnp.stack([stack("features", jnp.float32), stack("target", jnp.float32)], 3)
    _, _, k, _, width = features.shape  # [E, R, k, 2, F]
    num_clients = max(int(r["client"].max()) for r in runs) + 1
    defense = source_pca.pca(
        mode="detect", num_clients=num_clients, clients_per_round=k, num_classes=2,
        head_features=width, **{"source_class": 0, **pca_fields},
    )  # fmt: skip

    def step(memory, round_in):
        rows, global_rows, ids, number = round_in  # [k, 2, F], [2, F], [k], []
        view = base.RoundView(
            updates=jnp.ones((k, 1), jnp.float32),  # norm 1: the rows are scaled already
            head_rows=rows,
            global_head=global_rows,
            client_ids=ids,
            round=number - 1,  # 0-based, as the server counts
            root_update=jnp.zeros((1,), jnp.float32),
            valid=jnp.ones((k,), bool),
            global_params=jnp.zeros((1,), jnp.float32),  # the rule reads the head rows only
        )
        verdict, memory = defense.apply(view, memory)
        return memory, verdict.flags

    one = lambda xs: jax.lax.scan(step, defense.init(), xs)[1]
    inputs = (features, stack("global_rows", jnp.float32), stack("client", jnp.int32))
    inputs += (stack("round", jnp.int32),)
    return list(np.asarray(jax.jit(jax.vmap(one))(inputs)))


def precision_recall(predicted: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    tp = int(np.sum(predicted & truth))
    return tp / max(int(predicted.sum()), 1), tp / max(int(truth.sum()), 1)


def analyze(rows: dict, first_round: int, last_round: int, iters: int = 20) -> dict:
    """Clusters the window's rows in 2-D PCA and scores the verdicts against the truth."""
    keep = (rows["round"] >= first_round) & (rows["round"] <= last_round)
    if not keep.any():
        raise AnalysisError(
            f"no features in rounds {first_round} to {last_round}: choose another --rounds"
        )
    x = jnp.asarray(rows["features"][keep])
    valid = jnp.ones(x.shape[0], bool)
    points, in1, separation = source_pca.cluster_rows(x, valid, iters)
    malicious, _, _ = source_pca.judge(points, in1, valid, jnp.asarray(rows["sign"][keep]))
    truth, predicted = rows["malicious"][keep], np.asarray(malicious)
    in1 = np.asarray(in1)
    purity = max(np.mean(in1 == truth), np.mean(in1 != truth))
    clients = np.unique(rows["client"][keep])
    per_client = np.array([predicted[rows["client"][keep] == c].mean() > 0.5 for c in clients])
    client_truth = np.array([truth[rows["client"][keep] == c][0] for c in clients])
    row_p, row_r = precision_recall(predicted, truth)
    client_p, client_r = precision_recall(per_client, client_truth)
    return {
        "rounds": [first_round, last_round],
        "rows": int(keep.sum()),
        "silhouette": float(separation),
        "cluster_purity": float(purity),
        "row_precision": row_p,
        "row_recall": row_r,
        "client_precision": client_p,
        "client_recall": client_r,
        "points": np.asarray(points),
        "truth": truth,
        "predicted": predicted,
        "clients": clients,
        "client_verdict": per_client,
        "client_truth": client_truth,
    }


def plot_scatter(result: dict, title: str):
    """The paper's figure: the 2-D PCA of the rows, honest and malicious marked."""
    fig, ax = figures.plt.subplots(figsize=(6, 5))
    p, truth, predicted = result["points"], result["truth"], result["predicted"]
    for mask, label, color in ((~truth, "honest", "tab:blue"), (truth, "malicious", "tab:red")):
        ax.scatter(p[mask, 0], p[mask, 1], s=14, c=color, alpha=0.7, label=label)
    ax.scatter(
        p[predicted, 0],
        p[predicted, 1],
        s=60,
        facecolors="none",
        edgecolors="k",
        linewidths=0.8,
        label="flagged",
    )
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.legend()
    fig.suptitle(
        f"{title}\npurity {result['cluster_purity']:.2f}, precision {result['row_precision']:.2f},"
        f" recall {result['row_recall']:.2f}"
    )
    fig.tight_layout()
    return fig


def write_analysis(workdir: str, experiment: int, first_round: int, last_round: int) -> dict:
    """Runs the analysis for one experiment of a run and writes its files into the run's
    workdir (rounds first_round..last_round, numbered from 1)."""
    with Workdir.attach(workdir) as wd:  # a folder that is not a run's stops here
        rows = load_features(workdir, experiment)
        last_round = min(last_round, int(rows["round"].max()))
        result = analyze(rows, first_round, last_round)
        _write(wd, workdir, experiment, first_round, last_round, result)
    return {k: v for k, v in result.items() if not isinstance(v, np.ndarray)}


def _write(wd, workdir: str, experiment: int, first_round: int, last_round: int, result):
    suffix = f"_e{experiment}" if experiment else ""
    lines = ["client,malicious,flagged"] + [
        f"{c},{int(t)},{int(v)}"
        for c, t, v in zip(result["clients"], result["client_truth"], result["client_verdict"])
    ]
    scores = {k: v for k, v in result.items() if not isinstance(v, np.ndarray)}
    title = f"{os.path.basename(os.path.abspath(workdir))}: rounds {first_round}-{last_round}"
    figures.save(
        plot_scatter(result, f"{title}, {result['rows']} rows"), f"pca_scatter{suffix}", wd
    )
    wd.write_text(f"pca_verdicts{suffix}.csv", "\n".join(lines) + "\n")
    wd.write_json(f"pca_analysis{suffix}.json", scores)


def _cli() -> None:
    """Command line (flags are defined only when this module is the program)."""
    workdir = flags.DEFINE_string("workdir", None, "A run's workdir (with features/).")
    experiment = flags.DEFINE_integer("experiment", 0, "Which experiment of a sweep.")
    window = flags.DEFINE_string("rounds", "11:200", "first:last round of the window (from 1).")
    flags.mark_flags_as_required(["workdir"])

    def main(argv):
        del argv
        try:
            first, last = parse_rounds(window.value)
            path = os.path.expanduser(workdir.value)
            scores = write_analysis(path, experiment.value, first, last)
        except errors.UserError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt:  # each file is written whole (atomically), old or new
            print("error: interrupted: the files written so far are whole", file=sys.stderr)
            sys.exit(130)
        print(
            " ".join(
                f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in scores.items()
            )
        )

    app.run(main)


if __name__ == "__main__":
    signals.terminate_as_interrupt()
    _cli()
