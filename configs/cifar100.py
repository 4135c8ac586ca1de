"""CIFAR-100 with the paper's CIFAR-10 setup: 50 clients, 5 per round, 200 rounds, the
Table 5 CNN with 100 outputs, flip 35 (girl) -> 98 (woman).

    python launch.py --config=configs/cifar100.py --config.attack.malicious_fraction=0.3

The python files (train, test) in data.dir (default ~/.cache/cifar-100-python), or a
tensorflow-datasets copy (data.source=tfds). As slow as CIFAR-10 on a CPU (tens of
seconds a round): use an accelerator for the full run. `configs/cifar100.py:smoke` runs on
synthetic data of CIFAR-100's shapes in a few minutes.
"""

from fedjax_poison.config import configuration


def get_config(arg=None):
    c = configuration.paper_config("cifar100")
    return configuration.variant(c, arg, "configs/cifar100.py")
