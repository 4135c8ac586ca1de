"""An attack x defense matrix against as many experiments of one attack and one defense, in
one process.

    python benchmarks/matrix.py --quick                  # smoke run: mostly compiles
    python benchmarks/matrix.py                          # 4 attacks (+ none) x 4 defenses x 2 seeds
    python benchmarks/matrix.py --data-source=files      # the real Fashion-MNIST files

Three runs of `train.train_and_evaluate`, the paper's Fashion-MNIST CNN, the config's smoke
federation with the paper's k (10 clients, 5 a round; synthetic data unless --data-source
says otherwise):

(a) the matrix (`compare_defenses.plan`: the attacks and 'none' x the defenses x the seeds)
    as the run runs it: groups of one cell (`plan.experiment_groups`), each group running
    its own attack and defense only (`simulation.make_advance`);
(b) the same matrix as it ran before: one group, each experiment choosing its attack and
    defense by its own index, which the experiment axis batches, so that every experiment
    computes every attack and every defense of the run (`advance_per_experiment` below);
(c) as many experiments of the first attack and the first defense (seeds 0..E-1).

Each prints its compile time apart from its steady state (training and evaluation), and
experiment-rounds/s; the ratios (a) / (c) (the goal: >= 0.9) and (a) / (b). With
--repeats=R the three run R times in turn and the steady states are their medians; set
JAX_COMPILATION_CACHE_DIR to let the repeats reuse the compiled programs.
--compile-sizes=1x1,2x2,4x4 also compiles the matrix program of each size (attacks
without 'none' x defenses) without running it: how compile time grows with A and D.
"""

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from fedjax_poison import compare_defenses  # noqa: E402
from fedjax_poison.config import configuration  # noqa: E402
from fedjax_poison.config import plan as plan_lib  # noqa: E402
from fedjax_poison.round import sharding, simulation  # noqa: E402
from fedjax_poison.runner import setup, train  # noqa: E402

ATTACKS = "label_flip,sign_flip,alie,min_max"
DEFENSES = "fedavg,median,trimmed_mean,krum"


def advance_per_experiment(
    round_step,
    evaluate,
    max_rounds,
    clients_per_round,
    spmd_axis_name=None,
    feature_dim=0,
    experiment_shards=1,
    trigger=None,
):
    """simulation.make_advance as it was before groups of one cell: each experiment's
    scenario.attack and scenario.defense are its own, batched by the experiment axis."""

    def advance_one(state, scenario, data, test, num_rounds):
        def body(i, carry):
            state, records = carry
            state, record = round_step(state, scenario, data)
            records = jax.tree.map(lambda buf, r: buf.at[i].set(r), records, record)
            return state, records

        records = simulation.empty_records(max_rounds, clients_per_round, feature_dim)
        state, records = jax.lax.fori_loop(0, num_rounds, body, (state, records))
        x, y, mask = test
        views = [x] if trigger is None else [x, trigger(x)]
        confusion = jnp.stack(
            [evaluate(state.params, state.batch_stats, v, y, mask) for v in views]
        )
        return state, records, confusion

    in_axes = (0, 0, None, None, None)
    if jax.default_backend() == "cpu":
        advance_group = lambda states, scenarios, *shared: jax.lax.map(
            lambda each: advance_one(*each, *shared), (states, scenarios)
        )
    else:
        advance_group = jax.vmap(advance_one, in_axes=in_axes)
    advance_groups = jax.vmap(advance_group, in_axes=in_axes, spmd_axis_name=spmd_axis_name)

    def advance(states, scenarios, data, test, num_rounds):
        g = experiment_shards
        split = lambda a: a.reshape(g, a.shape[0] // g, *a.shape[1:])
        merge = lambda a: a.reshape(a.shape[0] * a.shape[1], *a.shape[2:])
        states, scenarios = jax.tree.map(split, (states, scenarios))
        return jax.tree.map(merge, advance_groups(states, scenarios, data, test, num_rounds))

    return advance


@contextlib.contextmanager
def as_before():
    """The run as it was before: one group for all cells, rules chosen per experiment."""
    groups, advance = plan_lib.experiment_groups, simulation.make_advance
    plan_lib.experiment_groups = lambda n, max_parallel, multiple=1, cells=None: groups(
        n, max_parallel, multiple
    )
    simulation.make_advance = advance_per_experiment
    try:
        yield
    finally:
        plan_lib.experiment_groups, simulation.make_advance = groups, advance


def base_config(args):
    c = configuration.smoke(configuration.paper_config("fashion_mnist"))
    c.data.source, c.data.dir = args.data_source, args.data_dir
    c.num_rounds = c.eval_every = args.rounds
    c.attack.flips = "6:0"
    c.checkpoint_every = args.rounds
    c.clients_per_round = 5  # the paper's k (Krum needs k > 2f + 2)
    if args.quick:
        c.data.synthetic_train, c.data.synthetic_test = 480, 200
        c.num_clients, c.clients_per_round, c.eval_batch_size = 8, 3, 100
    return c


def matrix_config(args, attack_names, defense_names):
    c, notes = compare_defenses.plan(base_config(args), attack_names, defense_names, args.seeds)
    if notes:
        raise SystemExit(f"defenses that cannot run here: {notes}")
    return c


def single_config(args, attack: str, defense: str, num: int):
    c = base_config(args)
    c.attack.name, c.defense.name = attack, defense
    c.sweep.seed = tuple(range(num))
    return c


def timed(c, workdir: str) -> dict:
    s = train.train_and_evaluate(c, workdir)
    return {"compile": s["compile_s"], "run": s["train_and_eval_s"], "final": s["final"]}


def compile_seconds(c) -> float:
    """Compiles the run's program of c (as train._train does) without running it."""
    p = plan_lib.build(c)
    programs = setup.build(p)
    group = list(p.groups[0])
    place = lambda tree: sharding.by_experiment(programs.mesh, tree)
    seeds = jnp.asarray([p.experiments[e].seed for e in group], jnp.int32)
    scenarios = jax.tree.map(lambda a: a[jnp.asarray(group)], programs.scenarios)
    t = time.perf_counter()
    programs.advance.lower(
        place(programs.init_states(seeds)),
        place(scenarios),
        programs.client_data,
        programs.test,
        jnp.int32(p.eval_every),
    ).compile()
    return time.perf_counter() - t


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--attacks", default=ATTACKS, help="rows, besides 'none'")
    p.add_argument("--defenses", default=DEFENSES, help="columns")
    p.add_argument("--seeds", default="0,1", type=lambda s: [int(x) for x in s.split(",")])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--data-source", default="synthetic", help="synthetic | files | tfds | auto")
    p.add_argument("--data-dir", default="", help="for files / tfds; '' = the default folder")
    p.add_argument("--quick", action="store_true", help="tiny clients, 2 attacks x 2 defenses")
    p.add_argument("--compile-sizes", default="", help="e.g. 1x1,2x2,4x4: compile only")
    args = p.parse_args(argv)
    attack_names, defense_names = args.attacks.split(","), args.defenses.split(",")
    if args.quick:
        attack_names, defense_names, args.rounds = attack_names[:2], defense_names[:2], 1
    sharding.use_cpu_devices(0)  # as launch.py: one device per core

    matrix = matrix_config(args, attack_names, defense_names)
    num = len(plan_lib.build(matrix).experiments)
    single = single_config(args, attack_names[0], defense_names[0], num)
    runs = {"a": [], "b": [], "c": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            runs["c"].append(timed(single, f"{tmp}/c{r}"))
            runs["a"].append(timed(matrix, f"{tmp}/a{r}"))
            with as_before():
                runs["b"].append(timed(matrix, f"{tmp}/b{r}"))
        sizes = [tuple(int(n) for n in s.split("x")) for s in args.compile_sizes.split(",") if s]
        jax.config.update("jax_enable_compilation_cache", False)  # compile each size for real
        compiles = [
            (a, d, compile_seconds(matrix_config(args, attack_names[:a], defense_names[:d])))
            for a, d in sizes
        ]

    rate = lambda key: num * args.rounds / statistics.median(t["run"] for t in runs[key])
    print(
        f"fashion_mnist CNN ({single.data.source}), {single.num_clients} clients, "
        f"{single.clients_per_round} a round, {args.rounds} rounds, evaluation at the end, "
        f"{jax.device_count()} {jax.default_backend()} devices, {args.repeats} repeat(s)"
    )
    print(
        f"matrix: attacks none,{','.join(attack_names)} x defenses {','.join(defense_names)} "
        f"x seeds {args.seeds} = {num} experiments"
    )
    head = f"{'':52s}{'compile s':>10s}{'run s':>9s}{'exp-rounds/s':>14s}"
    names = {
        "a": "(a) matrix, groups of one cell",
        "b": "(b) matrix as before, every rule for everyone",
        "c": f"(c) {num} x {attack_names[0]} / {defense_names[0]}",
    }
    lines = [head]
    for key, name in names.items():
        t = runs[key]
        run = statistics.median(x["run"] for x in t)
        lines.append(f"{name:52s}{t[0]['compile']:10.1f}{run:9.1f}{rate(key):14.2f}")
    lines.append(
        f"(a) / (c): {rate('a') / rate('c'):.2f}x    (a) / (b): {rate('a') / rate('b'):.2f}x"
    )
    gap = max(
        abs((x["accuracy"] or 0) - (y["accuracy"] or 0))
        for x, y in zip(runs["a"][0]["final"], runs["b"][0]["final"], strict=True)
    )
    lines.append(f"max |final accuracy (a) - (b)| over the experiments: {gap:.2g}")
    for a, d, seconds in compiles:
        lines.append(f"compile only, {a} attacks (+ none) x {d} defenses: {seconds:.1f} s")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
