"""CIFAR-10, the paper's setup: 50 clients, 5 per round, 200 rounds, flip 5 (dog) -> 3 (cat).

    python launch.py --config=configs/cifar.py --workdir=runs/cifar \
        --config.attack.malicious_fraction=0.1

Tens of seconds per round on a 2-core CPU; use an accelerator for the full 200 rounds.
`configs/cifar.py:smoke` runs on synthetic data of CIFAR-10's shapes in a few minutes.
"""

from fedjax_poison.config import configuration


def get_config(arg=None):
    c = configuration.paper_config("cifar10")
    return configuration.variant(c, arg, "configs/cifar.py")
