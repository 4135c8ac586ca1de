"""What a run leaves in its workdir: JSON files written atomically, metrics.jsonl, plots."""

import json
import math
import os
import tempfile
from collections.abc import Iterable, Sequence

import matplotlib

matplotlib.use("Agg")  # files only; never a display
import matplotlib.pyplot as plt  # noqa: E402


def _clean(value):
    """JSON-safe: NaN and inf become null, numpy scalars and arrays become Python values."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if hasattr(value, "tolist"):
        return _clean(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def dumps(obj) -> str:
    return json.dumps(_clean(obj), sort_keys=False)


def write_json(path: str, obj) -> None:
    """Writes JSON atomically: a temporary file in the same folder, then a rename."""
    write_text(path, json.dumps(_clean(obj), indent=2) + "\n")


def write_text(path: str, text: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    with tempfile.NamedTemporaryFile("w", dir=folder, delete=False, suffix=".tmp") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(f.name, path)


def append_lines(path: str, rows: Iterable[dict]) -> None:
    """Appends one JSON line per row and flushes them to disk."""
    with open(path, "a") as f:
        for row in rows:
            f.write(dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_lines(path: str) -> list[dict]:
    """The rows of a jsonl file; a torn last line (from a killed writer) is dropped."""
    if not os.path.exists(path):
        return []
    rows = []
    with open(path) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return rows


def truncate_lines(path: str, keep) -> None:
    """Rewrites a jsonl file keeping only the rows for which keep(row) is true."""
    rows = [r for r in read_lines(path) if keep(r)]
    write_text(path, "".join(dumps(r) + "\n" for r in rows))


def format_progress(round_done: int, num_rounds: int, rounds_per_s: float, metrics: dict) -> str:
    """One progress line: round, accuracy, source recall, speed and time left."""
    eta = (num_rounds - round_done) / rounds_per_s if rounds_per_s > 0 else float("inf")
    source = metrics.get("source_recall", float("nan"))
    return (
        f"round {round_done:4d}/{num_rounds}  acc {metrics['accuracy']:.4f}  "
        f"source recall {source:.3f}  {rounds_per_s:6.2f} rounds/s  ETA {_duration(eta)}"
    )


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def plot_curves(rows: Sequence[dict], labels: Sequence[str], path: str, title: str) -> None:
    """Accuracy and source-class recall over rounds, one line per experiment."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharex=True)
    experiments = sorted({r.get("experiment", 0) for r in rows})
    for e in experiments:
        mine = [r for r in rows if r.get("experiment", 0) == e]
        rounds = [r["round"] for r in mine]
        name = labels[e] if e < len(labels) else str(e)
        axes[0].plot(rounds, [r["accuracy"] for r in mine], label=name)
        axes[1].plot(rounds, [_nan(r["source_recall"]) for r in mine], label=name)
    for ax, ylabel in zip(axes, ("test accuracy", "source-class recall")):
        ax.set_xlabel("round")
        ax.set_ylabel(ylabel)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    if 1 < len(experiments) <= 12:
        axes[1].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _nan(value):
    return float("nan") if value is None else value
