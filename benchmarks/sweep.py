"""A sweep as one vmapped program vs. the same experiments run one by one, in one process.

    python benchmarks/sweep.py --quick                       # smoke run: mostly compiles
    python benchmarks/sweep.py --rounds=10 --experiments=8   # synthetic data
    python benchmarks/sweep.py --config=configs/paper/label_flipping.py --experiments=8 \
        --data-source=files                                  # the real files

(a) E experiments through one `train.train_and_evaluate`: one compile, the E experiments
advancing together on a leading axis. (b) The same E experiments, each through its own
`train_and_evaluate`: E compiles (each of the one-experiment shape) and E runs.
The E experiments are the config's first E (its sweep, or seeds 0..E-1 when it sweeps
nothing). Compile time is reported apart from run time (training and evaluation); wall
time also includes loading the data and building the program.
"""

import argparse
import importlib.util
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fedjax_poison import attacks  # noqa: E402
from fedjax_poison.config import configuration, experiments  # noqa: E402
from fedjax_poison.runner import train  # noqa: E402


def load_config(spec: str):
    """'path/to/config.py[:arg]' -> the file's get_config(arg)."""
    path, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("benchmarked_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def quick(c):
    """Seconds on a CPU: a few small synthetic clients, two rounds."""
    c = configuration.smoke(c)
    c.data.source = "synthetic"
    c.data.synthetic_train, c.data.synthetic_test = 480, 200
    c.num_clients, c.clients_per_round, c.num_rounds, c.eval_every = 8, 3, 2, 2
    c.eval_batch_size = 100
    return c


def chosen_experiments(c, num: int) -> list[experiments.Experiment]:
    """The config's first `num` experiments; seeds 0..num-1 when it sweeps nothing."""
    if not any(len(c.sweep[axis]) for axis in configuration.SWEEP_AXES):
        c.sweep.seed = tuple(range(num))
    exps = experiments.expand(c)
    if len(exps) < num:
        raise SystemExit(f"the config has {len(exps)} experiments, fewer than --experiments={num}")
    return exps[:num]


def _settings(exp: experiments.Experiment) -> dict:
    return {
        "malicious_fraction": exp.malicious_fraction,
        "flips": attacks.format_flips(exp.flips),
        "seed": exp.seed,
        "schedule": exp.schedule,
        "alpha": exp.alpha,
        "breakpoint": exp.breakpoint,
        "attack": exp.attack,
        "defense": exp.defense,
    }


def sweep_config(c, exps):
    """One config running exactly `exps` together (zip over every axis)."""
    c = c.copy_and_resolve_references()
    c.sweep.mode, c.sweep.max_parallel = "zip", 0
    for axis in configuration.SWEEP_AXES:
        c.sweep[axis] = tuple(_settings(e)[axis] for e in exps)
    return c


def single_config(c, exp):
    """One config running `exp` alone (no sweep)."""
    c = c.copy_and_resolve_references()
    s = _settings(exp)
    for axis in configuration.SWEEP_AXES:
        c.sweep[axis] = ()
    c.attack.malicious_fraction, c.attack.flips, c.seed = (
        s["malicious_fraction"],
        s["flips"],
        s["seed"],
    )
    c.selection.schedule, c.selection.breakpoint = s["schedule"], s["breakpoint"]
    c.selection.alpha, c.selection.alpha_after = s["alpha"]
    c.attack.name, c.defense.name = s["attack"], s["defense"]
    return c


def timed_run(c, workdir: str) -> dict:
    """train_and_evaluate with its wall time; returns wall, compile and run seconds, final rows."""
    t = time.perf_counter()
    summary = train.train_and_evaluate(c, workdir)
    wall = time.perf_counter() - t
    return {
        "wall": wall,
        "compile": summary["compile_s"],
        "run": summary["train_and_eval_s"],
        "final": summary["final"],
    }


def format_table(a: dict, b: dict, num: int, rounds: int) -> str:
    """The two timings side by side and (b) / (a)."""
    head = f"{'':28s}{'wall s':>10s}{'compile s':>11s}{'run s':>10s}{'exp-rounds/s':>14s}"
    line = lambda name, t: (
        f"{name:28s}{t['wall']:10.2f}{t['compile']:11.2f}{t['run']:10.2f}"
        f"{num * rounds / t['run']:14.2f}"
    )
    ratio = (
        f"{'(b) / (a)':28s}{b['wall'] / a['wall']:10.2f}{b['compile'] / a['compile']:11.2f}"
        f"{b['run'] / a['run']:10.2f}"
    )
    return "\n".join(
        [head, line(f"(a) one sweep, E={num}", a), line(f"(b) one by one, {num} runs", b), ratio]
    )


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/fashion_mnist.py", help="path[:arg]")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--experiments", type=int, default=8, help="E")
    p.add_argument("--data-source", default="synthetic", help="synthetic | files | tfds | auto")
    p.add_argument("--data-dir", default="", help="for files / tfds; '' = the default folder")
    p.add_argument("--quick", action="store_true", help="tiny synthetic problem, 2 experiments")
    p.add_argument("--workdir", default="", help="where the runs write; '' = a temporary folder")
    args = p.parse_args(argv)

    c = load_config(args.config)
    c.data.source, c.data.dir = args.data_source, args.data_dir
    c.num_rounds = args.rounds
    num = args.experiments
    if args.quick:
        c, num = quick(c), 2
    c.eval_every = min(c.eval_every, c.num_rounds)
    exps = chosen_experiments(c, num)
    configuration.validate(sweep_config(c, exps))

    with tempfile.TemporaryDirectory() as tmp:
        root = args.workdir or tmp
        a = timed_run(sweep_config(c, exps), os.path.join(root, "sweep"))
        singles = [
            timed_run(single_config(c, e), os.path.join(root, f"single{i}"))
            for i, e in enumerate(exps)
        ]
    b = {key: sum(s[key] for s in singles) for key in ("wall", "compile", "run")}
    gap = max(
        abs(row["accuracy"] - s["final"][0]["accuracy"]) for row, s in zip(a["final"], singles)
    )
    print(
        f"{c.dataset} ({c.data.source}), {c.num_clients} clients, {c.clients_per_round} per "
        f"round, {c.num_rounds} rounds, evaluation every {c.eval_every}, E={num}"
    )
    print(format_table(a, b, num, c.num_rounds))
    print(f"max |final accuracy, sweep - alone| over the experiments: {gap:.4f}")


if __name__ == "__main__":
    main()
