"""A user's defense: drop the updates whose norm exceeds `factor` times the round's median
norm (flagging them) and average the rest.

    python -m examples.custom_defense [WORKDIR]    # from the checkout

registers it, checks it against the contract every built-in rule passes (hostile rows,
client order), and runs it against a scaled sign-flip attack beside FedAvg, printing each
one's accuracy and detection.
"""

import sys

import jax.numpy as jnp

import fedjax_poison
from fedjax_poison import defenses, testing
from fedjax_poison.config import configuration
from fedjax_poison.defenses import base, numeric


def norm_filter(*, mode: str, factor: float = 2.0) -> defenses.Defense:
    """Keep the valid updates with norm <= factor x the median norm of the valid updates;
    flag the others (Sun et al. 2019's norm bound, as a filter)."""
    if not 1 <= factor < float("inf"):
        raise ValueError(f"factor must be a finite number >= 1, got {factor!r}")

    def apply(view, memory):
        valid, updates = numeric.clean(view)  # [k] bool, [k, d] with invalid rows zeroed
        size = base.row_norms(updates)  # [k]
        kept = valid & (size <= factor * numeric.masked_median(size, valid))
        aggregate = base.weighted_mean(updates, kept.astype(jnp.float32))
        scores = jnp.where(valid, size, 0.0)
        flags = valid & ~kept
        verdict = base.flagging_verdict(updates, flags, scores, mode, aggregate, valid=valid)
        return verdict, memory

    return defenses.Defense(base.no_memory, apply, root_size=0, flags_clients=True)


fedjax_poison.register_defense("norm_filter", norm_filter)


def config():
    """Sign flipping, boosted 10x, by 30% of the clients, against FedAvg and norm_filter."""
    c = configuration.smoke(configuration.paper_config("fashion_mnist"))
    c.num_rounds, c.eval_every, c.tensorboard = 8, 4, False
    c.attack.name = "sign_flip"
    c.attack.sign_flip.factor = 10.0
    c.sweep.defense = ("fedavg", "norm_filter")
    return c


def main(workdir=None) -> dict:
    """{defense: final row of the summary} of the sweep."""
    testing.check_defense("norm_filter")
    result = fedjax_poison.run(config(), workdir, name="custom_defense")
    rows = {r["defense"]: r for r in result.summary["final"]}
    for name, row in rows.items():
        detected = row.get("detection_precision"), row.get("detection_recall")
        print(
            f"{name:>12}: accuracy {row['accuracy_window']:.3f}, detection "
            f"precision/recall {detected}"
        )
    return rows


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
