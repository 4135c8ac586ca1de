"""The paper's central claim on the real Fashion-MNIST files: label flipping is targeted.

Half of the 50 clients flip shirt (6) to T-shirt (0). Over the last rounds, class-6
recall falls far below the clean run's, while the classes that are neither source nor
target stay within a few points. One round's recall swings with how many of its 5
clients were malicious, so the test compares means over the last evaluations.
"""

import os

import numpy as np
import pytest

from fedjax_poison import data, files
from fedjax_poison.config import configuration
from fedjax_poison.runner import train

pytestmark = pytest.mark.slow  # the paper's claim on real data: minutes

FILES = data.SPECS["fashion_mnist"].default_dir


@pytest.mark.skipif(
    not os.path.exists(os.path.join(FILES, "train-images-idx3-ubyte.gz")),
    reason="needs the Debian package dataset-fashion-mnist",
)
def test_label_flipping_hurts_the_source_class_only(tmp_path):
    c = configuration.paper_config("fashion_mnist")
    c.data.source = "files"
    c.num_rounds, c.eval_every = 30, 3
    c.attack.flips = "6:0"
    c.sweep.malicious_fraction = (0.0, 0.5)  # clean and attacked, same seed, one program
    train.train_and_evaluate(c, str(tmp_path))
    rows = [r for r in files.read_lines(str(tmp_path / "metrics.jsonl")) if r["round"] > 15]
    clean = [r for r in rows if r["malicious_fraction"] == 0.0]
    attacked = [r for r in rows if r["malicious_fraction"] == 0.5]
    assert clean[-1]["accuracy"] > 0.83  # the clean model learned

    recall = lambda rs: np.mean([r["recall"] for r in rs], axis=0)  # [C]
    clean_recall, attacked_recall = recall(clean), recall(attacked)
    assert attacked_recall[6] < 0.5 * clean_recall[6]
    others = [c for c in range(10) if c not in (6, 0)]
    assert abs(attacked_recall[others].mean() - clean_recall[others].mean()) < 0.03
    # Shirts predicted as T-shirts: the attack's success, against the clean model's own
    # confusion of the two (its rows carry no flip, so the records' confusion matrices).
    chunks = [np.load(p) for p in sorted((tmp_path / "records").glob("r*.npz"))]
    late = [chunk for chunk in chunks if chunk["eval_round"] > 15]
    # A records file per group and evaluation: the clean twin's rows in its group's files.
    ours = lambda chunk: list(chunk["experiment"])
    confusion = np.mean(
        [
            c["confusion"][ours(c).index(clean[0]["experiment"])]
            for c in late
            if clean[0]["experiment"] in ours(c)
        ],
        axis=0,
    )  # [C, C]
    clean_rate = confusion[6, 0] / confusion[6].sum()
    attacked_rate = np.mean([r["attack_success_rate"] for r in attacked])
    assert attacked_rate > 2 * clean_rate
