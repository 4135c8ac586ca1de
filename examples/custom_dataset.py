"""A user's dataset: scikit-learn's handwritten digits (1,797 images of 8 x 8 pixels, shipped
with scikit-learn), registered from arrays and split over clients with Dirichlet label skew.

    python -m examples.custom_dataset [WORKDIR]    # from the checkout

registers it, checks it against the dataset contract, and trains the MLP of the model zoo
on it with 40% of 20 clients flipping 1 -> 7.
"""

import sys

import numpy as np
from sklearn.datasets import load_digits

import fedjax_poison
from fedjax_poison import testing
from fedjax_poison.config import configuration


def digits_arrays(test_share: float = 0.25, seed: int = 0):
    """(x_train, y_train, x_test, y_test): uint8 images [M, 8, 8, 1] (0..16 scaled to
    0..240), labels 0..9, a shuffled split."""
    digits = load_digits()
    x = (digits.images * 15).astype(np.uint8)[..., None]
    order = np.random.default_rng(seed).permutation(len(x))
    cut = int(len(x) * (1 - test_share))
    train, test = order[:cut], order[cut:]
    return x[train], digits.target[train], x[test], digits.target[test]


fedjax_poison.register_dataset(
    "digits",
    arrays=digits_arrays(),
    recipe=dict(model=dict(name="mlp"), batch_size=8, lr=0.05, flips="1:7"),
)


def config():
    """20 clients, 5 a round, Dirichlet(1.0) skew, 40% flipping 1 -> 7, and the clean twin."""
    c = configuration.paper_config("digits")
    c.num_clients, c.clients_per_round, c.num_rounds, c.eval_every = 20, 5, 20, 5
    c.tensorboard = False
    c.data.partition = "dirichlet"
    c.data.dirichlet.alpha = 1.0
    c.sweep.malicious_fraction = (0.0, 0.4)
    return c


def main(workdir=None) -> dict:
    """{malicious_fraction: final row of the summary}."""
    testing.check_dataset("digits")
    result = fedjax_poison.run(config(), workdir, name="custom_dataset")
    rows = {r["malicious_fraction"]: r for r in result.summary["final"]}
    for fraction, row in sorted(rows.items()):
        print(
            f"{fraction:.0%} malicious: accuracy {row['accuracy_window']:.3f}, "
            f"recall of 1 {row['source_recall_window']:.3f}"
        )
    return rows


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
