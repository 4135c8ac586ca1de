"""A user's attack: each malicious client sends the round's honest mean update reversed and
scaled (a "reverse gradient" attack; it knows the round's honest updates).

    python -m examples.custom_attack [WORKDIR]     # from the checkout

registers it, checks it against the contract every built-in attack passes, and runs it
against FedAvg and the coordinate-wise median on synthetic Fashion-MNIST-shaped data (about
a minute on 2 CPU cores), printing each defense's accuracy beside its clean twin's.
"""

import sys

import jax.numpy as jnp

import fedjax_poison
from fedjax_poison import attacks, testing
from fedjax_poison.config import configuration


def reverse_mean(*, factor: float = 3.0) -> attacks.Attack:
    """Send -factor x the mean of the round's honest updates. Knows: the honest updates."""
    if not 0 < factor < float("inf"):
        raise ValueError(f"factor must be a finite number > 0, got {factor!r}")

    def poison_updates(updates, ctx):  # updates [k, d], ctx.poisoned [k]
        mean, _ = attacks.benign_moments(updates, ctx.poisoned)  # [d]
        return jnp.where(ctx.poisoned[:, None], -factor * mean[None, :], updates)

    return attacks.Attack(attacks.clean_data, poison_updates, "untargeted")


fedjax_poison.register_attack("reverse_mean", reverse_mean)


def config():
    """The reverse-mean attack at 30% and its clean twin, under FedAvg and the median."""
    c = configuration.smoke(configuration.paper_config("fashion_mnist"))
    c.num_rounds, c.eval_every, c.tensorboard = 8, 4, False
    c.attack.name = "reverse_mean"
    c.sweep.malicious_fraction = (0.0, 0.3)
    c.sweep.defense = ("fedavg", "median")
    return c


def main(workdir=None) -> dict:
    """{(defense, malicious_fraction): stable accuracy} of the sweep."""
    testing.check_attack("reverse_mean")
    result = fedjax_poison.run(config(), workdir, name="custom_attack")
    accuracy = {
        (r["defense"], r["malicious_fraction"]): r["accuracy_window"]
        for r in result.summary["final"]
    }
    for (defense, fraction), value in sorted(accuracy.items()):
        print(f"{defense:>8} at {fraction:.0%} malicious: accuracy {value:.3f}")
    return accuracy


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
