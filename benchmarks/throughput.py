"""Throughput of the vectorized round against a per-client loop, centralized training and PyTorch.

    python benchmarks/throughput.py                            # Fashion-MNIST, paper's round
    python benchmarks/throughput.py --clients-per-round 50     # 50 clients a round
    python benchmarks/throughput.py --dataset cifar10 --curves none
    python benchmarks/throughput.py --quick                    # CI: tiny sizes, < 1 minute

Measured side by side in one process, on the same clients (k a round, n examples and
batch B each), for one experiment:
  1. vectorized round: `setup.build(plan)`'s compiled `advance`, the real code path
     (selection, gather, vmapped local training, FedAvg; evaluation timed apart), as a run
     places it by default: the round's clients over every device (on CPU, one per core),
     and again on one device (mesh.clients=1);
  2. per-client loop: a jitted one-client `local_train` called k times from Python, then a
     jitted FedAvg (how FedJAX's default backend and most simulators run a round);
  3. centralized: the same model trained on all k*n examples at batch k*B for the same
     number of steps, jitted: what a round cannot beat;
  4. PyTorch: the sequential reference (`--peer`), run as a subprocess with --torch-python,
     Fashion-MNIST only (it reads the real files; the others default to synthetic data of the
     same shapes). Skipped when torch is not installed there.
A round is training + aggregation; "eval" is one pass over the test set, which the paper
does every round. GFLOP/s counts 3 x 2 x the forward multiply-adds per example (the usual
training estimate). Compile times are apart. Then scaling curves, as CSV and PNG in --out:
round time against k (--curve-k) and sweep throughput against E experiments (--curve-e).
Repeats alternate the methods; timings on a shared machine vary, read medians side by side.
About 10 minutes with curves on 2 CPU cores; `--curves none` skips them.
"""

import argparse
import csv
import json
import os
import re
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from fedjax_poison import data, models  # noqa: E402
from fedjax_poison.config import configuration, plan  # noqa: E402
from fedjax_poison.round import client, metrics, sharding, simulation  # noqa: E402
from fedjax_poison.runner import setup  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Output size of each convolution, in the order of the model's Conv_i layers.
CONV_SIZES = {"fashion_mnist_cnn": (28, 14), "cifar10_cnn": (32, 32, 16, 16, 8, 8)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--dataset", default="fashion_mnist", choices=("fashion_mnist", "cifar10"))
    p.add_argument("--data", default="synthetic", choices=("synthetic", "files"))
    p.add_argument("--data-dir", default="", help="the files' folder ('' = the default)")
    p.add_argument("--clients-per-round", type=int, default=5, help="k")
    p.add_argument("--batch", type=int, default=None, help="B (default: the paper's, 4 or 10)")
    p.add_argument("--num-clients", type=int, default=50, help="N")
    p.add_argument("--conv-impl", default="auto", choices=("auto", "im2col", "xla"))
    p.add_argument("--examples-per-client", type=int, default=None, help="n (synthetic data)")
    p.add_argument("--test-size", type=int, default=10_000, help="test examples (synthetic)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--curves", default="all", choices=("all", "k", "e", "none"))
    p.add_argument("--curve-k", default="5,10,20,50,100", help="clients per round")
    p.add_argument("--curve-e", default="1,2,4,8,16,32", help="experiments of a sweep")
    p.add_argument("--curve-repeats", type=int, default=2)
    p.add_argument(
        "--peer", default=os.path.join(REPO, "..", "shared", "peer", "torch_reference.py")
    )
    p.add_argument("--torch-python", default=os.path.expanduser("~/venv-torch/bin/python"))
    p.add_argument(
        "--torch-threads", default=f"1,{os.cpu_count()}", help="one PyTorch row per value"
    )
    p.add_argument("--out", default=os.path.join(REPO, "benchmarks", "out"))
    p.add_argument(
        "--one-device-rows",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also measure ours on one device, where a run uses several",
    )
    p.add_argument("--quick", action="store_true", help="tiny sizes, 1 repeat, no PyTorch")
    a = p.parse_args(argv)
    defaults = data.SPECS[a.dataset].recipe
    a.batch = a.batch or defaults["batch_size"]
    if a.examples_per_client is None:  # the paper's: the training set over 50 clients
        a.examples_per_client = 1200 if a.dataset == "fashion_mnist" else 1000
    if a.quick:
        a.num_clients, a.clients_per_round, a.examples_per_client = 6, 2, 8 * a.batch
        a.test_size, a.repeats, a.curve_repeats = 64, 1, 1
        a.curve_k, a.curve_e = "2,4", "1,2"
    return a


ONE_DEVICE = (("clients", 1),)


def make_config(a, k: int, num_experiments: int = 1, mesh: tuple = ()):
    """The paper's config at k clients a round of n examples each, evaluated every round.

    mesh: (field, value) pairs of the mesh block; () keeps the default (mesh.clients=0,
    every device, on CPU one per core).
    """
    c = configuration.paper_config(a.dataset)
    c.mesh.update(dict(mesh))
    c.data.source = a.data
    c.data.dir = a.data_dir
    c.num_clients = max(a.num_clients, k)
    c.data.synthetic_train = c.num_clients * a.examples_per_client
    c.data.synthetic_test = a.test_size
    c.clients_per_round, c.batch_size = k, a.batch
    c.model[c.model.name].conv_impl = a.conv_impl
    c.eval_every, c.num_rounds = 1, 1
    c.eval_batch_size = min(c.eval_batch_size, a.test_size)
    if num_experiments > 1:
        c.sweep.seed = tuple(range(num_experiments))
    return c


def build_model(c):
    return models.make_model(models.spec_of(c.model.to_dict()), data.SPECS[c.dataset].num_classes)


def train_flops_per_example(model_name: str, params) -> float:
    """3 x 2 x forward multiply-adds (convolutions at their output sizes, dense layers)."""
    macs = sum(
        size * size * params[f"Conv_{i}"]["kernel"].size
        for i, size in enumerate(CONV_SIZES[model_name])
    )
    dense = [v["kernel"] for name, v in params.items() if not name.startswith(("Conv", "Batch"))]
    macs += sum(kernel.size for kernel in dense)
    return 6.0 * macs


_BUILT = {}


def built(kind, a, k: int, num_experiments: int = 1, mesh: tuple = ()):
    """One Vectorized / Loop per (kind, k, E, mesh): the table and the curves share compiles."""
    key = (kind, k, num_experiments, mesh)
    if key not in _BUILT:
        if kind == "ours":
            _BUILT[key] = Vectorized(make_config(a, k, num_experiments, mesh))
        else:
            c = make_config(a, k, mesh=ONE_DEVICE)
            cls = Loop if kind == "loop" else Centralized
            _BUILT[key] = cls(c, build_model(c), on_first_device(built("ours", a, k).s.client_data))
    return _BUILT[key]


def on_first_device(tree):
    """A copy of tree on one device (the loop and centralized rows run on one)."""
    return jax.device_put(tree, jax.devices()[0])


def timed(fn, *args):
    t = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    return out, time.perf_counter() - t


class Vectorized:
    """The real code path: setup.build's compiled advance for 1 round (+ eval) or 0 (eval only)."""

    def __init__(self, c):
        run_plan = plan.build(c)
        self.s = setup.build(run_plan)
        seeds = jnp.asarray([e.seed for e in run_plan.experiments], jnp.int32)
        # Placed as train.py places a group: split over the mesh's experiment axis.
        self.states = sharding.by_experiment(self.s.mesh, self.s.init_states(seeds))
        self.scenarios = sharding.by_experiment(self.s.mesh, self.s.scenarios)
        t = time.perf_counter()
        self.compiled = self.s.advance.lower(
            self.states, self.scenarios, self.s.client_data, self.s.test, jnp.int32(1)
        ).compile()
        self.compile_s = time.perf_counter() - t
        self.run(1)  # warm-up

    def run(self, rounds: int) -> float:
        args = (self.scenarios, self.s.client_data, self.s.test, jnp.int32(rounds))
        t = time.perf_counter()
        self.states, records, confusion = self.compiled(self.states, *args)
        jax.block_until_ready((self.states, records, confusion))
        return time.perf_counter() - t

    def measure(self, repeats: int) -> tuple[list, list]:
        """(round = training + aggregation, evaluation) seconds, one pair per repeat."""
        rounds, evals = [], []
        for _ in range(repeats):
            with_eval, only_eval = self.run(1), self.run(0)
            rounds.append(max(with_eval - only_eval, 1e-9))  # a tiny round: not zero
            evals.append(only_eval)
        return rounds, evals


class Loop:
    """A Python loop over the k clients of a round, each a call of a jitted local_train."""

    def __init__(self, c, model, data_on_device):
        spec = data.SPECS[c.dataset]
        settings = client.TrainSettings(c.batch_size, c.local_epochs, c.momentum, c.augment)
        self.k, self.lr, self.data = c.clients_per_round, c.lr, data_on_device
        self.rng = np.random.default_rng(0)
        self.params, self.stats = models.init_variables(model, jax.random.key(0), spec.image_shape)
        options = setup.compiler_options()
        self.local = jax.jit(
            client.make_local_train(model, spec, settings), compiler_options=options
        )
        self.average = jax.jit(lambda trees: jax.tree.map(lambda t: t.mean(0), trees))
        self.evaluate = jax.jit(metrics.make_evaluate(model, spec), compiler_options=options)
        self.evaluated = False
        t = time.perf_counter()
        self.local = self.local.lower(*self._args(0, jax.random.key(0))).compile()
        self.compile_s = time.perf_counter() - t
        self.round()  # warm-up, and compiles the average

    def _args(self, c, key):
        width = int(self.data.count.max())
        x, y, count = simulation.client_examples(self.data, jnp.array([c]), width)
        return self.params, self.stats, x[0], y[0], count[0], jnp.float32(self.lr), key

    def round(self) -> float:
        t = time.perf_counter()
        chosen = self.rng.choice(self.data.count.shape[0], self.k, replace=False)
        results = [self.local(*self._args(int(c), jax.random.key(int(c)))) for c in chosen]
        stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *[r[:2] for r in results])
        self.params, self.stats = jax.block_until_ready(self.average(stacked))
        return time.perf_counter() - t

    def eval(self, test) -> float:
        if not self.evaluated:  # compile
            self.evaluated = timed(self.evaluate, self.params, self.stats, *test) is not None
        return timed(self.evaluate, self.params, self.stats, *test)[1]


class Centralized:
    """The same model on all k*n examples at batch k*B, for the same number of steps."""

    def __init__(self, c, model, data_on_device):
        spec = data.SPECS[c.dataset]
        k, b = c.clients_per_round, c.batch_size
        settings = client.TrainSettings(k * b, c.local_epochs, c.momentum, c.augment)
        params, stats = models.init_variables(model, jax.random.key(0), spec.image_shape)
        total = int(np.asarray(data_on_device.count[:k]).sum())  # the first k clients' examples
        x, y = data_on_device.x[:total], data_on_device.y[:total]
        count = jnp.int32(total)
        self.args = (params, stats, x, y, count, jnp.float32(c.lr), jax.random.key(0))
        t = time.perf_counter()
        options = setup.compiler_options()
        self.train = jax.jit(
            client.make_local_train(model, spec, settings), compiler_options=options
        )
        self.train = self.train.lower(*self.args).compile()
        self.compile_s = time.perf_counter() - t
        self.round()

    def round(self) -> float:
        return timed(self.train, *self.args)[1]


def run_torch(a, k: int, threads: int) -> dict | None:
    """The PyTorch reference's per-round times, or None (with the reason printed)."""
    if a.quick or a.dataset != "fashion_mnist":
        return None
    if not (os.path.exists(a.torch_python) and os.path.exists(a.peer)):
        print(f"PyTorch: skipped ({a.torch_python} or {a.peer} not found)")
        return None
    cmd = [a.torch_python, os.path.abspath(a.peer), "--rounds", str(a.repeats + 1)]
    cmd += ["--per-round", str(k), "--batch", str(a.batch), "--clients", str(a.num_clients)]
    cmd += ["--threads", str(threads)]
    proc = subprocess.run(
        cmd, cwd=os.path.dirname(os.path.abspath(a.peer)), capture_output=True, text=True
    )
    result = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not result:
        print(f"PyTorch: failed ({proc.stderr.strip().splitlines()[-1:]})")
        return None
    res = json.loads(result[0][len("RESULT ") :])
    pattern = r"round\s+\d+ train\s+([\d.]+)s avg\s+([\d.]+)s eval\s+([\d.]+)s"
    rows = [tuple(map(float, m)) for m in re.findall(pattern, proc.stdout)][1:]  # 1st: warm-up
    res["rounds_s"] = [t + avg for t, avg, _ in rows]
    res["evals_s"] = [e for _, _, e in rows]
    res["examples"] = res["train_examples_per_s"] * res["train_s_median"]
    res["version"] = proc.stdout.split()[1]
    return res


def summarize(name, rounds, evals, examples, flops, compile_s):
    med = statistics.median(rounds)
    return {
        "method": name,
        "round_s_median": med,
        "round_s_min": min(rounds),
        "round_s_max": max(rounds),
        "examples_per_s": examples / med,
        "gflop_per_s": examples * flops / med / 1e9,
        "eval_s_median": statistics.median(evals) if evals else float("nan"),
        "compile_s": compile_s,
    }


def main_table(a, flops) -> list[dict]:
    k, devices = a.clients_per_round, sharding.auto_clients(1, a.clients_per_round)
    ours, loop, central = (built(kind, a, k) for kind in ("ours", "loop", "central"))
    one = built("ours", a, k, 1, ONE_DEVICE) if devices > 1 and a.one_device_rows else None
    examples, test = ours.s.examples_per_round, on_first_device(ours.s.test)
    times = {"ours": ([], []), "one": ([], []), "loop": ([], []), "central": ([], [])}
    for _ in range(a.repeats):  # alternating, so that load from elsewhere hits all alike
        r, e = ours.measure(1)
        times["ours"][0].extend(r), times["ours"][1].extend(e)
        if one:
            r, e = one.measure(1)
            times["one"][0].extend(r), times["one"][1].extend(e)
        times["loop"][0].append(loop.round()), times["loop"][1].append(loop.eval(test))
        times["central"][0].append(central.round())
    name = "vectorized round (vmap, ours)"
    if devices > 1:
        name += f": clients over {devices} {jax.default_backend()} devices, the default"
    rows = [summarize(name, *times["ours"], examples, flops, ours.compile_s)]
    if one:
        name = "ours on one device (mesh.clients=1)"
        rows.append(summarize(name, *times["one"], examples, flops, one.compile_s))
    rows += [
        summarize("per-client loop + FedAvg", *times["loop"], examples, flops, loop.compile_s),
        summarize("centralized, batch k*B", *times["central"], examples, flops, central.compile_s),
    ]
    for threads in [int(v) for v in str(a.torch_threads).split(",") if v]:
        torch = run_torch(a, k, threads)
        if torch:
            name = f"PyTorch {torch['version']} loop, {threads} thread(s)"
            times = (torch["rounds_s"], torch["evals_s"], torch["examples"])
            rows.append(summarize(name, *times, flops, np.nan))
    for row in rows:
        row["vs_ours"] = rows[0]["round_s_median"] / row["round_s_median"]
    return rows


def format_table(rows) -> str:
    columns = ["method", "s/round median", "min", "max", "examples/s", "GFLOP/s", "vs ours"]
    columns += ["eval s", "compile s"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['round_s_median']:.3f} | {r['round_s_min']:.3f} | "
            f"{r['round_s_max']:.3f} | {r['examples_per_s']:,.0f} | {r['gflop_per_s']:.1f} | "
            f"{r['vs_ours']:.2f}x | {_maybe(r['eval_s_median'], '.3f')} | "
            f"{_maybe(r['compile_s'], '.1f')} |"
        )
    return "\n".join(lines)


def _maybe(value, fmt):
    return "-" if value != value or value is None else format(value, fmt)  # NaN: not measured


def curve_k(a, flops) -> list[dict]:
    rows = []
    for k in [int(v) for v in a.curve_k.split(",")]:
        devices = sharding.auto_clients(1, k)
        ours, loop = built("ours", a, k), built("loop", a, k)
        one = built("ours", a, k, 1, ONE_DEVICE) if devices > 1 and a.one_device_rows else None
        examples = ours.s.examples_per_round
        times = {"ours": [], "loop": [], "one_device": []}
        for _ in range(a.curve_repeats):
            times["ours"].extend(ours.measure(1)[0])
            times["loop"].append(loop.round())
            if one:
                times["one_device"].extend(one.measure(1)[0])
        row = {"k": k, "devices": devices, "examples_per_round": examples}
        for name, t in times.items():
            if t:
                row[f"{name}_round_s"] = statistics.median(t)
                row[f"{name}_examples_per_s"] = examples / row[f"{name}_round_s"]
        row["ours_gflop_per_s"] = row["ours_examples_per_s"] * flops / 1e9
        row["loop_over_ours"] = row["loop_round_s"] / row["ours_round_s"]
        line = f"  k={k}: ours over {devices} device(s) {row['ours_round_s']:.3f} s"
        if one:
            line += f", ours on one device {row['one_device_round_s']:.3f} s"
        line += f", loop {row['loop_round_s']:.3f} s ({row['loop_over_ours']:.2f}x ours)"
        print(line)
        rows.append(row)
    return rows


def curve_e(a) -> list[dict]:
    """Experiment-rounds/s for E experiments: by default (the round's clients over the
    devices), and with the experiments over them (mesh.experiments), where they divide."""
    rows = []
    devices = sharding.auto_clients(1, a.clients_per_round)
    for e in [int(v) for v in a.curve_e.split(",")]:
        ours = built("ours", a, a.clients_per_round, e)
        rounds, evals = ours.measure(a.curve_repeats)
        row = {"experiments": e, "round_s": statistics.median(rounds)}
        row["eval_s"] = statistics.median(evals)
        row["experiment_rounds_per_s"] = e / row["round_s"]
        row["with_eval_per_s"] = e / (row["round_s"] + row["eval_s"])
        line = f"  E={e}: {row['round_s']:.3f} s a round, {row['experiment_rounds_per_s']:.2f}/s"
        line += f", with evaluation {row['with_eval_per_s']:.2f}/s"
        if devices > 1 and e % devices == 0:
            mesh = (("experiments", devices), ("clients", 1))
            spread = built("ours", a, a.clients_per_round, e, mesh)
            rounds, evals = spread.measure(a.curve_repeats)
            row["mesh_with_eval_per_s"] = e / (statistics.median(rounds) + statistics.median(evals))
            line += f"; experiments over {devices} devices {row['mesh_with_eval_per_s']:.2f}/s"
        else:
            row["mesh_with_eval_per_s"] = float("nan")
        print(line)
        rows.append(row)
    return rows


def write_csv(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def plot(path, x, series, xlabel, ylabel, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for label, ys in series.items():
        ax.plot(x, ys, marker="o", label=label)
    ax.set(xscale="log", yscale="log", xlabel=xlabel, ylabel=ylabel, title=title)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2))  # below: no overlap
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def main(argv=None):
    a = parse_args(argv)
    sharding.use_cpu_devices(0)  # as launch.py: one device per core on CPU
    os.makedirs(a.out, exist_ok=True)
    c = make_config(a, a.clients_per_round)
    model = build_model(c)
    params, _ = models.init_variables(model, jax.random.key(0), data.SPECS[a.dataset].image_shape)
    flops = train_flops_per_example(c.model.name, params)
    print(
        f"{a.dataset} ({a.data}), k={a.clients_per_round} clients x n={a.examples_per_client}"
        f" examples, B={a.batch}; {flops / 1e6:.1f} MFLOP per training example; "
        f"jax {jax.__version__} on {jax.devices()[0].device_kind}, {os.cpu_count()} cores, "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    rows = main_table(a, flops)
    table = format_table(rows)
    print(table)
    write_csv(os.path.join(a.out, "table.csv"), rows)
    with open(os.path.join(a.out, "table.md"), "w") as f:
        f.write(table + "\n")
    if a.curves in ("all", "k"):
        print("round time against clients per round:")
        ks = curve_k(a, flops)
        write_csv(os.path.join(a.out, "scaling_k.csv"), ks)
        x = [r["k"] for r in ks]
        series = {"vectorized (ours, default devices)": [r["ours_round_s"] for r in ks]}
        if all("one_device_round_s" in r for r in ks):
            series["ours on one device"] = [r["one_device_round_s"] for r in ks]
        series["per-client loop"] = [r["loop_round_s"] for r in ks]
        plot(
            os.path.join(a.out, "scaling_k.png"),
            x,
            series,
            "clients per round k",
            "seconds per round",
            f"{a.dataset}: training + FedAvg",
        )
    if a.curves in ("all", "e"):
        print("sweep throughput against experiments:")
        es = curve_e(a)
        write_csv(os.path.join(a.out, "sweep_e.csv"), es)
        x = [r["experiments"] for r in es]
        series = {"training + FedAvg": [r["experiment_rounds_per_s"] for r in es]}
        series["with evaluation"] = [r["with_eval_per_s"] for r in es]
        if any(r["mesh_with_eval_per_s"] == r["mesh_with_eval_per_s"] for r in es):
            series["with evaluation, experiments over the devices"] = [
                r["mesh_with_eval_per_s"] for r in es
            ]
        plot(
            os.path.join(a.out, "sweep_e.png"),
            x,
            series,
            "experiments E",
            "experiment-rounds per second",
            f"{a.dataset}: one program for E experiments",
        )
    print(f"wrote {a.out} (load average now {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
