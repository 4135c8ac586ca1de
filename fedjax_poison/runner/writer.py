"""Every file of a run's workdir, written through one `Workdir` (atomic, 0644, recorded).

    config.json          the config the run was launched with
    environment.json     versions and device, and any other environment it resumed in
    experiments.json     one entry per experiment: settings, attackers, clean twin, measure
    metrics.jsonl        one row per experiment and evaluation (evaluation.py)
    records/             per evaluation chunk: what every round did (npz); clients.npz
    features/            save_features: the source-class rows for the offline PCA analysis
    tensorboard/         event files, one folder per experiment (tensorboardX)
    summary.json         the last row and the stable measures of each experiment, times
    results.*, *.png/pdf tables and figures (report.write_report)

Only the primary process of a multi-host run writes; the others' Workdir writes nothing.
"""

import importlib.metadata
import io
import logging
import math
import os
import platform
import zipfile

import jax
import numpy as np

from fedjax_poison import files
from fedjax_poison.config import experiments as experiments_lib
from fedjax_poison.config import plan as plan_lib
from fedjax_poison.config import sweeps
from fedjax_poison.results import evaluation
from fedjax_poison.runner.checkpoint import CheckpointError
from fedjax_poison.runner.workdir import Workdir

log = logging.getLogger("fedjax_poison")
METRICS = "metrics.jsonl"
PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy")


def environment() -> dict:
    """Versions and device: same config, seed and environment give bitwise equal metrics."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "python": platform.python_version(),
        **versions,
        "backend": jax.default_backend(),
        "device_kind": jax.devices()[0].device_kind,
        "device_count": jax.device_count(),
    }


def describe(plan: plan_lib.Plan, programs) -> list[dict]:
    """experiments.json: one entry per experiment: its label, the swept values (`axes`),
    every axis's value (sweeps.record), then what the run made of it."""
    malicious = np.asarray(programs.scenarios.malicious)
    entries = []
    for e, exp in enumerate(plan.experiments):
        attack = programs.attack_of[e]
        entries.append(
            {
                "experiment": e,
                "label": experiments_lib.label(exp),
                "axes": {k: list(v) if isinstance(v, tuple) else v for k, v in exp.axes.items()},
                **sweeps.record(exp.values),
                "measure": attack.measure,
                "backdoor_target": attack.target if attack.measure == "backdoor" else -1,
                "clean_twin": plan.clean_twins[e],
                "malicious_clients": np.flatnonzero(malicious[e]).tolist(),
            }
        )
    return entries


def npz_bytes(**arrays) -> bytes:
    """An .npz file (np.load reads it) whose bytes depend on the arrays only: np.savez
    stamps the time into its zip entries, which a resumed run would change."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for key, value in arrays.items():
            entry = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            entry.compress_type = zipfile.ZIP_DEFLATED
            with archive.open(entry, "w") as f:
                np.lib.format.write_array(f, np.asanyarray(value), allow_pickle=False)
    return buffer.getvalue()


class RunWriter:
    """The files of one run; `rows` holds every metrics row written (or read back)."""

    def __init__(self, workdir: Workdir, plan: plan_lib.Plan, programs):
        self.workdir, self.plan, self.programs = workdir, plan, programs
        self.rows: list[dict] = []
        self._tensorboard = {}

    def start(self, saved: dict | None, rewindow: bool = False) -> None:
        """Writes the run's description and cuts metrics.jsonl back to the checkpoint `saved`
        (rows computed after it are computed again), or empties it for a fresh run.

        rewindow: the run's num_rounds grew, and with it perhaps the stable window: the
        rows kept get their `*_window` values over the new one.
        """
        w, plan = self.workdir, self.plan
        w.write_json("config.json", plan.config)
        self._write_environment(resumed=saved is not None)
        w.write_json("experiments.json", describe(plan, self.programs))
        self._write_npz(
            "records/clients.npz",
            class_counts=self.programs.class_counts,
            malicious=np.asarray(self.programs.scenarios.malicious),
        )
        if saved is None:
            w.write_text(METRICS, "")
            return
        group_of = {e: i for i, g in enumerate(plan.groups) for e in g}
        at = (saved["group"], saved["round"])
        kept = w.truncate_lines(METRICS, lambda r: (group_of[r["experiment"]], r["round"]) <= at)
        if kept != saved["lines"]:
            raise CheckpointError(
                f"{w.join(METRICS)} was changed: the run wrote {saved['lines']} rows up to "
                f"round {saved['round']} of experiment group {saved['group'] + 1}, the file "
                f"holds {kept}: use another --workdir, or --config.overwrite=True to start again"
            )
        self.rows = w.read_lines(METRICS)
        if rewindow:
            self._rewindow()

    def _rewindow(self) -> None:
        """The kept rows' stable measures over plan.eval_window, as a run of this length
        computes them; metrics.jsonl is rewritten only if a value changed."""
        again, seen = [], {}
        for row in self.rows:
            history = seen.setdefault(row["experiment"], [])
            again.append(evaluation.add_window(dict(row), history, self.plan.eval_window))
            history.append(again[-1])
        if again != self.rows:
            self.workdir.write_text(METRICS, "".join(files.dumps(r) + "\n" for r in again))
            self.rows = again

    def _write_environment(self, resumed: bool) -> None:
        now = environment()
        path = "environment.json"
        if not (resumed and self.workdir.exists(path)):
            self.workdir.write_json(path, now)
            return
        record = self.workdir.read_json(path)
        seen = [{k: v for k, v in record.items() if k != "resumed_in"}]
        seen += record.get("resumed_in", [])
        if now not in seen:
            log.warning(
                "resuming in another environment than %s: metrics may differ from an "
                "uninterrupted run in the last digits",
                seen[-1],
            )
            record["resumed_in"] = record.get("resumed_in", []) + [now]
            self.workdir.write_json(path, record)

    def history(self, experiment: int) -> list[dict]:
        return [r for r in self.rows if r["experiment"] == experiment]

    def chunk(self, group: tuple, first_round: int, records, confusion, rows: list[dict]) -> None:
        """One evaluation chunk: its rows, its records, its tensorboard points, its features."""
        self.workdir.append_lines(METRICS, rows)
        self.rows += rows
        name = f"r{first_round:05d}_e{group[0]:04d}.npz"
        rounds = first_round + np.arange(records.selected.shape[1])  # 1-based
        slots = [g for g, _ in plan_lib.members(group)]
        self._write_npz(
            f"records/{name}",
            experiment=np.asarray(group)[slots],
            round=rounds,
            eval_round=np.int32(rounds[-1]),
            confusion=np.asarray(confusion)[slots, 0],
            **{
                field: np.asarray(getattr(records, field))[slots]
                for field in ("selected", "malicious", "poisoned", "flags", "valid")
                + ("weights", "scores", "loss", "finite", "degenerate")
            },
        )
        if self.plan.save_features:
            self._write_npz(
                f"features/{name}",
                experiment=np.asarray(group)[slots],  # [G]
                round=rounds,  # [R], 1-based
                client=records.selected[slots],  # [G, R, k]
                malicious=records.malicious[slots],
                flagged=records.flags[slots],
                features=records.features[slots],  # [G, R, k, F]
                sign=records.feature_sign[slots],
                target=records.feature_target[slots],  # [G, R, k, F]
                global_rows=records.feature_global[slots],  # [G, R, 2, F]: source, target
            )
        if self.plan.tensorboard and self.workdir.primary:  # tensorboardX makes its folders
            self._to_tensorboard(rows)

    def _write_npz(self, name: str, **arrays) -> None:
        self.workdir.write_bytes(name, npz_bytes(**arrays))

    def _to_tensorboard(self, rows: list[dict]) -> None:
        for row in rows:
            e = row["experiment"]
            if e not in self._tensorboard:
                self._tensorboard[e] = self._open_tensorboard(e, row["round"])
            tb = self._tensorboard[e]
            if tb is None:
                continue
            for key, value in row.items():
                number = isinstance(value, (int, float)) and not isinstance(value, bool)
                if number and math.isfinite(value) and key not in ("round", "experiment"):
                    tb.add_scalar(key, value, row["round"])
            tb.flush()

    def _open_tensorboard(self, e: int, first_round: int):
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            if not self._tensorboard:
                log.warning("tensorboard=True needs `pip install tensorboardX`: no event files")
            return None
        folder = self.workdir.folder("tensorboard")
        label = experiments_lib.label(self.plan.experiments[e]).replace(" ", "_")
        # purge_step drops events a resumed run computes again.
        path = f"{folder}/e{e:04d}_{label}"[:240]
        tb = SummaryWriter(path, purge_step=first_round)
        for name in os.listdir(path):  # its event file, listed as the run's
            if name.startswith("events.out.tfevents."):
                self.workdir.own(os.path.relpath(os.path.join(path, name), self.workdir.path))
        return tb

    def close(self) -> None:
        for tb in self._tensorboard.values():
            if tb is not None:
                tb.close()
        self._tensorboard = {}
