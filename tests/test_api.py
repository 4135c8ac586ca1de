"""fedjax_poison.run from Python, as a notebook calls it: progress on the log, the history
and the summary returned, a workdir made when none is given."""

import logging
import os

import pytest
from test_simulation import tiny_config

import fedjax_poison


@pytest.mark.slow  # a whole run
def test_run_returns_history_and_summary_and_logs_progress(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    c = tiny_config(num_rounds=4, **{"attack.malicious_fraction": 0.25})
    c.tensorboard = True
    with caplog.at_level(logging.INFO, logger="fedjax_poison"):
        result = fedjax_poison.run(c, name="notebook")
    assert result.workdir.startswith(str(tmp_path / "runs" / "notebook"))
    assert [r["round"] for r in result.history] == [2, 4]
    assert result.summary["final"] == [result.history[-1]]
    assert result.history[-1]["accuracy_window"] is not None
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("compiling the round") for m in messages)
    assert any("rounds/s" in m and "ETA" in m for m in messages)
    assert any(m.startswith("results in ") for m in messages)
    events = os.listdir(os.path.join(result.workdir, "tensorboard"))
    assert len(events) == 1 and os.listdir(os.path.join(result.workdir, "tensorboard", events[0]))


def test_import_does_not_load_jax():
    import subprocess
    import sys

    code = "import sys, fedjax_poison; print('jax' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "False", out.stderr
