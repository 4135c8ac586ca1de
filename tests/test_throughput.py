"""benchmarks/throughput.py --quick runs end to end: the table and the curves' files appear."""

import csv
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # a benchmark run: minutes on 2 cores

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quick_benchmark_prints_the_table_and_writes_the_curves(tmp_path):
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "benchmarks", "throughput.py"), "--quick"]
        + ["--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert "| method | s/round median |" in out
    for method in ("vectorized round", "per-client loop", "centralized"):
        assert method in out
    for name in ("table.csv", "table.md", "scaling_k.csv", "scaling_k.png", "sweep_e.csv"):
        assert (tmp_path / name).stat().st_size > 0, name
    with open(tmp_path / "table.csv") as f:
        rows = list(csv.DictReader(f))
    # ours (by default over 2 devices: k=2, 2 cores), ours on one device, loop, centralized
    assert len(rows) == 4 and float(rows[0]["vs_ours"]) == 1.0
    assert "clients over 2 cpu devices, the default" in rows[0]["method"]
    assert "one device" in rows[1]["method"]
    assert all(float(r["examples_per_s"]) > 0 for r in rows)
    with open(tmp_path / "scaling_k.csv") as f:
        assert [int(r["k"]) for r in csv.DictReader(f)] == [2, 4]
    with open(tmp_path / "sweep_e.csv") as f:
        assert [int(r["experiments"]) for r in csv.DictReader(f)] == [1, 2]
