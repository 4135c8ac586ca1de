"""Cross-device federations: waste, memory and speed of ragged client data against the padded
layout, over the population N, the label skew alpha and the clients per round k.

    python benchmarks/cross_device.py                  # the tables below, ~15 minutes on 2 cores
    python benchmarks/cross_device.py --data files     # the measured rows on the real Fashion-MNIST
    python benchmarks/cross_device.py --quick          # tiny sizes, < 2 minutes

1. Waste (steps computed / steps that carry data) and the memory of the clients' data, from
   the partition itself, over 100 random rounds of k clients, for the Dirichlet split of
   N * n examples (n = --examples-per-client): padded (every client runs the steps of the
   federation's largest, data stored [N, n_max]) against ragged (data stored once; the
   round's clients sorted by size, trained `clients_at_once` at a time, each group stopping
   with its largest client) on this machine's grouping (CPU: the run's automatic one) and
   with the whole round at once (an accelerator's default) or in 16 groups
   (`clients_at_once` = k/16, for an accelerator that k clients saturate).
2. Measured, side by side in one process, with the real compiled round (`setup.build`):
   rounds/s and examples/s (examples that carry data) of the ragged round, of the padded
   layout on the same clients, and of an IID round of the same k and examples per round.
3. --population N: a run of N clients (synthetic, 10 examples each on average) for a few
   rounds in a subprocess, with its peak memory (host; on CPU the device's memory is the
   host's).
Timings on a shared machine vary: read the ratios, measured side by side.
"""

import argparse
import contextlib
import os
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from fedjax_poison.config import configuration, plan  # noqa: E402
from fedjax_poison.data import partition  # noqa: E402
from fedjax_poison.round import client, sharding  # noqa: E402
from fedjax_poison.runner import setup  # noqa: E402

IMAGE_BYTES = 28 * 28  # Fashion-MNIST, uint8


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--num-clients", default="1000,3000,10000,100000", help="N of table 1")
    p.add_argument("--alphas", default="0.1,0.3,1,10", help="Dirichlet alpha of table 1")
    p.add_argument("--ks", default="10,50,200", help="k of table 1")
    p.add_argument("--examples-per-client", type=int, default=20, help="n, the mean")
    p.add_argument("--batch", type=int, default=8, help="B")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument(
        "--measured",
        default="1000:0.1:50,1000:1:50,3000:0.3:50,1000:0.1:200",
        help="N:alpha:k settings of table 2",
    )
    p.add_argument("--rounds", type=int, default=10, help="rounds per timing")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--data", default="synthetic", choices=("synthetic", "files"))
    p.add_argument("--population", type=int, default=100_000, help="N of part 3 (0: skip)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--child", default="", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.quick:
        a.num_clients, a.alphas, a.ks = "1000,10000", "0.1,10", "10,50"
        a.measured, a.rounds, a.repeats, a.population = "300:0.1:20", 3, 1, 20_000
    return a


def ints(text):
    return [int(v) for v in text.split(",") if v]


def sizes_of(num_clients: int, alpha: float, per_client: int, seed: int = 0) -> np.ndarray:
    """[N] client sizes of the Dirichlet split of N * per_client labels over 10 classes."""
    labels = np.arange(num_clients * per_client) % 10
    _, count = partition.partition_dirichlet(
        labels, num_clients, alpha, np.random.default_rng(seed), 10
    )
    return count


def waste(sizes, k, settings, at_once, rounds=100, seed=0):
    """(padded, ragged) mean waste over random rounds of k clients."""
    rng = np.random.default_rng(seed)
    bound = client.max_steps(int(sizes.max()), settings)
    padded, ragged = [], []
    for _ in range(rounds):
        steps = client.steps_of(sizes[rng.choice(len(sizes), k, replace=False)], settings)
        padded.append(client.round_waste(steps, 0, bound=bound))
        ragged.append(client.round_waste(steps, at_once))
    return float(np.mean(padded)), float(np.mean(ragged))


def table_waste(a):
    settings = client.TrainSettings(a.batch, a.epochs, 0.9, False, ragged=True)
    on_cpu = jax.default_backend() == "cpu"
    at_once = sharding.cpu_chunk(a.batch * IMAGE_BYTES, jax.local_device_count()) if on_cpu else 0
    print(
        f"\n## 1. Waste and data memory (Dirichlet over N x {a.examples_per_client} examples, "
        f"B={a.batch}, {a.epochs} epoch(s); 100 random rounds)\n"
    )
    print(f"ragged groups on this machine: {at_once or 'k'} client(s) at once\n")
    print(
        "| N | alpha | k | n_max / mean | waste padded | waste ragged | ragged, all k at once "
        "| ragged, k/16 at once | data padded | data ragged |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for n in ints(a.num_clients):
        for alpha in [float(v) for v in a.alphas.split(",")]:
            sizes = sizes_of(n, alpha, a.examples_per_client)
            padded_bytes = n * int(sizes.max()) * IMAGE_BYTES
            ragged_bytes = int(sizes.sum()) * IMAGE_BYTES + 8 * n
            for k in ints(a.ks):
                if k > n:
                    continue
                w_pad, w_rag = waste(sizes, k, settings, at_once)
                _, w_all = waste(sizes, k, settings, 0)
                _, w_16 = waste(sizes, k, settings, -(-k // 16))
                print(
                    f"| {n:,} | {alpha:g} | {k} | {sizes.max() / sizes.mean():.1f} | "
                    f"{w_pad:.2f}x | {w_rag:.2f}x | {w_all:.2f}x | {w_16:.2f}x | "
                    f"{gib(padded_bytes)} | {gib(ragged_bytes)} |"
                )


def gib(nbytes: int) -> str:
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**28 else f"{nbytes / 2**20:.0f} MiB"


def make_config(a, num_clients, k, alpha, partition_name="dirichlet", total=None):
    c = configuration.paper_config("fashion_mnist")
    c.data.source = a.data
    c.num_clients, c.clients_per_round = num_clients, k
    c.data.partition = partition_name
    c.data.dirichlet.alpha = alpha
    c.data.synthetic_train = total or num_clients * a.examples_per_client
    c.data.synthetic_test = 100
    c.eval_batch_size = 100
    c.batch_size, c.local_epochs, c.lr = a.batch, a.epochs, 0.01
    c.num_rounds = c.eval_every = a.rounds
    c.tensorboard = False
    return c


@contextlib.contextmanager
def padded_layout():
    """Every client runs the steps of the federation's largest, as before ragged data."""
    original = setup.train_settings
    setup.train_settings = lambda run_plan, sizes: run_plan.train
    try:
        yield
    finally:
        setup.train_settings = original


class Timed:
    """The real compiled round of a config: seconds of `rounds` rounds (evaluation apart)."""

    def __init__(self, c, rounds):
        run_plan = plan.build(c)
        self.s = setup.build(run_plan)
        seeds = jnp.asarray([e.seed for e in run_plan.experiments], jnp.int32)
        self.states = sharding.by_experiment(self.s.mesh, self.s.init_states(seeds))
        self.scenarios = sharding.by_experiment(self.s.mesh, self.s.scenarios)
        self.rounds = rounds
        self.examples = float(self.s.examples_per_round)
        self.run(rounds)  # compile and warm up

    def run(self, rounds) -> float:
        args = (self.scenarios, self.s.client_data, self.s.test, jnp.int32(rounds))
        t = time.perf_counter()
        self.states, *out = self.s.advance(self.states, *args)
        jax.block_until_ready((self.states, out))
        return time.perf_counter() - t

    def round_s(self) -> float:
        return max(self.run(self.rounds) - self.run(0), 1e-9) / self.rounds


def table_measured(a):
    print(
        f"\n## 2. Measured ({a.data} data, B={a.batch}, {a.epochs} epoch(s), "
        f"{jax.default_backend()}, {a.rounds} rounds a timing, median of {a.repeats})\n"
    )
    print(
        "| N | alpha | k | examples/round | rounds/s ragged | padded | IID | "
        "examples/s ragged | ragged / padded | ragged / IID (examples/s) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for setting in [v for v in a.measured.split(",") if v]:
        n, alpha, k = setting.split(":")
        n, alpha, k = int(n), float(alpha), int(k)
        config = make_config(a, n, k, alpha)
        ragged = Timed(config, a.rounds)
        with padded_layout():
            padded = Timed(config, a.rounds)
        # IID: k clients of the same mean size, as many clients as the data allows.
        per_client = max(a.batch, int(round(ragged.examples / k / a.epochs)))
        iid_clients = max(k, 60_000 // per_client) if a.data == "files" else k
        iid = Timed(
            make_config(a, iid_clients, k, alpha, "iid", total=iid_clients * per_client), a.rounds
        )
        times = {name: [] for name in ("ragged", "padded", "iid")}
        for _ in range(a.repeats):  # alternate, so that load hits all alike
            for name, timed in (("ragged", ragged), ("padded", padded), ("iid", iid)):
                times[name].append(timed.round_s())
        med = {name: float(np.median(t)) for name, t in times.items()}
        ex = {"ragged": ragged.examples, "padded": ragged.examples, "iid": iid.examples}
        rate = {name: ex[name] / med[name] for name in med}
        print(
            f"| {n:,} | {alpha:g} | {k} | {ragged.examples:.0f} | {1 / med['ragged']:.2f} | "
            f"{1 / med['padded']:.2f} | {1 / med['iid']:.2f} | {rate['ragged']:,.0f} | "
            f"{med['padded'] / med['ragged']:.2f}x | {rate['ragged'] / rate['iid']:.2f}x |"
        )


def population_child(a):
    """Runs N clients for a few rounds; prints the run's time and peak memory."""
    n = a.population
    c = make_config(a, n, 50, 1.0, total=10 * n)
    c.data.source = "synthetic"
    c.attack.malicious_fraction = 10 / n
    c.defense.name = "median"
    t = time.perf_counter()
    timed = Timed(c, 3)
    built = time.perf_counter() - t
    round_s = timed.round_s()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(
        f"| {n:,} | {int(timed.s.client_sizes.sum()):,} | {built:.0f} s | {1 / round_s:.2f} | "
        f"{gib(peak)} |"
    )


def table_population(a):
    print(
        f"\n## 3. A population of {a.population:,} clients (synthetic, Dirichlet alpha 1, "
        "k=50, 10 attackers, median)\n"
    )
    print("| N | examples | set-up and compile | rounds/s | peak memory (host + device) |")
    print("|---|---|---|---|---|")
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "population"]
    cmd += ["--population", str(a.population), "--batch", str(a.batch)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    rows = [line for line in out.stdout.splitlines() if line.startswith("|")]
    print(rows[-1] if rows else f"failed: {out.stderr.strip().splitlines()[-1:]}")


def main(argv=None):
    a = parse_args(argv)
    if a.child == "population":
        population_child(a)
        return
    print(f"# Cross-device benchmark ({jax.default_backend()}, {jax.local_device_count()} devices)")
    table_waste(a)
    if a.measured:
        table_measured(a)
    if a.population:
        table_population(a)


if __name__ == "__main__":
    main()
