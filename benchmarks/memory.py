"""Device memory of a compiled round, per client of a round and per experiment of a sweep.

    python benchmarks/memory.py                       # both paper models, a few minutes
    python benchmarks/memory.py --dataset cifar10

Compiles the real `advance` (setup.build) at several k (clients per round) and E
(experiments run at once) and reads XLA's memory analysis: the inputs (client data, test
set, states), the outputs and the temporaries. The slopes give the bytes each extra
client of a round and each extra experiment costs; "per GiB" is how many fit in one GiB
beyond the fixed part (the client data and the test set, held once). Compiles only; no
round runs. The figures are the current backend's: on CPU, clients train in cache-sized
chunks (sharding.cpu_chunk), which caps the training temporaries; on accelerators all
k train at once and the per-client slope is larger.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from fedjax_poison.config import configuration, plan  # noqa: E402
from fedjax_poison.runner import setup  # noqa: E402

GIB = 2**30


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--dataset", default="both", choices=("both", "fashion_mnist", "cifar10"))
    p.add_argument("--clients", default="5,20,50", help="k values (one experiment)")
    p.add_argument("--experiments", default="1,4,8", help="E values (k = the paper's 5)")
    return p.parse_args(argv)


def footprint(dataset: str, k: int, num_experiments: int) -> dict:
    """Bytes of one compiled advance: inputs, outputs and temporaries."""
    c = configuration.paper_config(dataset)
    c.data.source = "synthetic"  # same shapes as the real sets
    c.data.synthetic_train, c.data.synthetic_test = (60_000, 10_000)
    if dataset == "cifar10":
        c.data.synthetic_train = 50_000
    c.num_clients = max(50, k)
    c.clients_per_round = k
    if num_experiments > 1:
        c.sweep.seed = tuple(range(num_experiments))
    s = setup.build(plan.build(c))
    states = s.init_states(jnp.arange(num_experiments, dtype=jnp.int32))
    lowered = s.advance.lower(states, s.scenarios, s.client_data, s.test, jnp.int32(1))
    m = lowered.compile().memory_analysis()
    fixed = sum(x.nbytes for x in jax.tree.leaves((s.client_data, s.test)))
    return {
        "inputs": m.argument_size_in_bytes,
        "outputs": m.output_size_in_bytes,
        "temporaries": m.temp_size_in_bytes,
        "data": fixed,  # client data + test set, held once
        "total": m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes,
    }


def slope(xs, totals) -> float:
    return float(np.polyfit(np.asarray(xs, float), np.asarray(totals, float), 1)[0])


def report(dataset: str, ks, es) -> None:
    print(f"{dataset} on {jax.default_backend()} ({jax.devices()[0].device_kind}):")
    print("| k | E | data MiB | inputs MiB | temporaries MiB | outputs MiB | total MiB |")
    print("|---|---|---|---|---|---|---|")
    points = sorted({(k, 1) for k in ks} | {(5, e) for e in es} | {(5, 1)})
    totals = {}
    for k, e in points:
        f = footprint(dataset, k, e)
        totals[k, e] = f["total"]
        mib = {key: value / 2**20 for key, value in f.items()}
        print(
            f"| {k} | {e} | {mib['data']:.1f} | {mib['inputs']:.1f} | {mib['temporaries']:.1f} "
            f"| {mib['outputs']:.1f} | {mib['total']:.1f} |"
        )
    per_client = slope(*zip(*[(k, t) for (k, e), t in totals.items() if e == 1]))
    per_experiment = slope(*zip(*[(e, t) for (k, e), t in totals.items() if k == 5]))
    print(
        f"per extra client of a round: {per_client / 2**20:.2f} MiB "
        f"({GIB / max(per_client, 1.0):,.0f} clients per GiB); per extra experiment (k=5): "
        f"{per_experiment / 2**20:.2f} MiB "
        f"({GIB / max(per_experiment, 1.0):,.0f} experiments per GiB)"
    )


def main(argv=None):
    a = parse_args(argv)
    ks = [int(v) for v in a.clients.split(",")]
    es = [int(v) for v in a.experiments.split(",")]
    for dataset in ("fashion_mnist", "cifar10") if a.dataset == "both" else (a.dataset,):
        report(dataset, ks, es)


if __name__ == "__main__":
    main()
