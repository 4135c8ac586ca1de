"""Every defense, and chains of pre-aggregators, in one run on the default CPU mesh.

The round's clients are split over one CPU device per core (2 here); the server's part
runs on every device. A batched LAPACK call in a rule (the PCA defense's
eigendecomposition, with the source class unknown) once left both devices waiting on each
other forever, so this runs in a subprocess with a time limit. One compiled program
switches between the rules (sweep.defense); every experiment must finish with a finite
model, and the rows must say which rules flag clients.
"""

import json
import os
import subprocess
import sys

import pytest

from fedjax_poison import defenses

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHAINS = ("nnm+krum", "bucketing+median", "norm_clipping+bucketing+trimmed_mean")
RULES = tuple(sorted(defenses.DEFENSES)) + CHAINS


@pytest.mark.slow  # a whole run
def test_every_defense_runs_on_the_default_mesh(tmp_path):
    command = [
        sys.executable,
        os.path.join(REPO, "launch.py"),
        f"--config={os.path.join(REPO, 'configs', 'fashion_mnist.py')}:smoke",
        "--config.data.synthetic_train=700",
        "--config.data.synthetic_test=100",
        "--config.num_clients=10",
        "--config.clients_per_round=7",  # bulyan needs k >= 4f + 3
        "--config.batch_size=50",
        "--config.eval_batch_size=100",
        "--config.num_rounds=2",
        "--config.tensorboard=False",
        "--config.defense.pca.source_class=-1",  # pca over every class: the batched case
        f"--config.sweep.defense={RULES!r}",
        f"--workdir={tmp_path}",
    ]
    env = dict(
        os.environ,
        JAX_COMPILATION_CACHE_DIR=os.path.expanduser("~/.cache/fedjax_poison_tests"),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    )
    env.pop("XLA_FLAGS", None)  # the default: one device per core
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.load(open(tmp_path / "summary.json"))
    experiments = json.load(open(tmp_path / "experiments.json"))
    assert [e["defense"] for e in experiments] == list(RULES)
    assert summary["diverged"] == []
    for row in summary["final"]:
        assert 0 < row["accuracy"] <= 1
        flags = defenses.make_defense(
            _block(experiments[row["experiment"]]["defense"]),
            num_clients=10,
            clients_per_round=7,
            num_params=10,
            num_classes=10,
            head_features=4,
        ).flags_clients
        assert ("detection_precision" in row) == flags, row["experiment"]


def _block(name: str):
    block = defenses.default_config()
    block.name = name
    return block
