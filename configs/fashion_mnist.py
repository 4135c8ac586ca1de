"""Fashion-MNIST, the paper's setup: 50 clients, 5 per round, 200 rounds, flip 6 -> 0.

    python launch.py --config=configs/fashion_mnist.py --workdir=runs/fmnist \
        --config.attack.malicious_fraction=0.5

About 10 to 20 minutes on a 2-core CPU (200 rounds, evaluation every round).
`configs/fashion_mnist.py:smoke` runs on synthetic data in well under a minute.
"""

from fedjax_poison.config import configuration


def get_config(arg=None):
    c = configuration.paper_config("fashion_mnist")
    return configuration.variant(c, arg, "configs/fashion_mnist.py")
