"""A sweep over two processes on localhost (two CPU devices each) equals one process."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from fedjax_poison.runner import train

pytestmark = pytest.mark.slow  # two processes joined by jax.distributed: minutes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The run of tiny_config (test_simulation) with 2 seeds, as command-line overrides.
OVERRIDES = {
    "data.synthetic_train": 480,
    "data.synthetic_test": 200,
    "num_clients": 8,
    "clients_per_round": 4,
    "num_rounds": 3,
    "eval_every": 2,
    "eval_batch_size": 100,
    "attack.malicious_fraction": 0.25,
    "sweep.seed": "(0,1)",
    "checkpoint_every": 2,
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _launch_two_processes(workdir: str) -> list[subprocess.CompletedProcess]:
    coordinator = f"localhost:{_free_port()}"
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    env["JAX_PLATFORMS"] = "cpu"
    procs = []
    for process_id in range(2):
        flags = {
            **OVERRIDES,
            "mesh.experiments": 2,
            "mesh.clients": 2,
            "distributed.coordinator": coordinator,
            "distributed.num_processes": 2,
            "distributed.process_id": process_id,
        }
        cmd = [sys.executable, "launch.py", "--config=configs/fashion_mnist.py:smoke"]
        cmd += [f"--workdir={workdir}"] + [f"--config.{k}={v}" for k, v in flags.items()]
        procs.append(
            subprocess.Popen(
                cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
        )
    results = []
    for p in procs:
        out, _ = p.communicate(timeout=600)
        results.append(subprocess.CompletedProcess(p.args, p.returncode, out))
    return results


def test_two_hosts_equal_one_host_and_only_process_0_writes(tmp_path):
    from test_simulation import tiny_config

    workdir = tmp_path / "two_hosts"
    results = _launch_two_processes(str(workdir))
    for r in results:
        assert r.returncode == 0, r.stdout[-3000:]
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    # 2 experiments x evaluations after rounds 2 and 3, each row written once.
    assert sorted((r["experiment"], r["round"]) for r in rows) == [(0, 2), (0, 3), (1, 2), (1, 3)]
    environment = json.loads((workdir / "environment.json").read_text())
    assert environment["device_count"] == 4
    assert "final:" not in results[1].stdout  # the summary is process 0's

    c = tiny_config(num_rounds=3, clients_per_round=4, checkpoint_every=2)
    c.sweep.seed = (0, 1)
    c.attack.malicious_fraction = 0.25
    one = train.train_and_evaluate(c, str(tmp_path / "one_host"))["final"]
    two = [r for r in rows if r["round"] == 3]
    for a, b in zip(one, sorted(two, key=lambda r: r["experiment"]), strict=True):
        assert a["malicious_selected"] == b["malicious_selected"]
        np.testing.assert_allclose(a["recall"], b["recall"], atol=0.02)
        assert abs(a["accuracy"] - b["accuracy"]) < 0.01
