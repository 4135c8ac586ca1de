"""MNIST with the paper's Fashion-MNIST setup: 50 clients, 5 per round, 200 rounds, the
Table 6 CNN, flip 7 -> 1.

    python launch.py --config=configs/mnist.py --config.attack.malicious_fraction=0.3

The raw files (train-images-idx3-ubyte.gz, ...) in data.dir (default ~/.cache/mnist), or a
tensorflow-datasets copy (data.source=tfds). `configs/mnist.py:smoke` runs on synthetic
data of MNIST's shapes in under a minute. Time as for Fashion-MNIST (see its config).
"""

from fedjax_poison.config import configuration


def get_config(arg=None):
    c = configuration.paper_config("mnist")
    return configuration.variant(c, arg, "configs/mnist.py")
