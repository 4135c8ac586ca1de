"""train_and_evaluate(config, workdir): one run (or one sweep) from config to workdir files."""

import dataclasses
import os
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from fedjax_poison import (
    attacks,
    checkpoint,
    client,
    configuration,
    data,
    defenses,
    experiments,
    metrics,
    models,
    report,
    sharding,
    simulation,
    tables,
)


class DivergenceError(RuntimeError):
    """A model went non-finite (NaN or inf); the message names the experiment and round."""


@dataclasses.dataclass(frozen=True)
class Setup:
    """Everything a run builds from its config before the first round."""

    spec: data.DatasetSpec
    experiments: list
    client_data: simulation.ClientData  # on device
    test: tuple  # (x, y, mask) batched, on device
    advance: object  # jitted advance(states, scenarios, data, test, num_rounds)
    init_states: object  # seeds [E] -> ServerState [E]
    mesh: object  # jax.sharding.Mesh, or None on one device
    scenarios: simulation.Scenario  # [E], host arrays (placed per group)
    defense: defenses.Defense  # the run's defense set as one (defenses.select)
    flags_clients: list  # [E] bool: the experiment's defense flags clients
    attack_of: list  # [E] attacks.Attack: each experiment's attack (measure, backdoor target)
    examples_per_round: int


def conv_impl(name: str) -> str:
    """'auto' picks im2col on CPU (see models.Conv) and XLA's convolution elsewhere."""
    if name != "auto":
        return name
    return "im2col" if jax.default_backend() == "cpu" else "xla"


def compiler_options() -> dict[str, str]:
    """XLA options for the run's programs on the current backend.

    On CPU, matrix products go to XNNPACK: a round trains 1.15-1.3x faster and evaluates
    about 1.25x faster than with XLA's own dot emitter (benchmarks/README.md).
    """
    if jax.default_backend() != "cpu":
        return {}
    return {"xla_cpu_experimental_xnn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"}


def build_client_data(c: ml_collections.ConfigDict, dataset: data.Dataset):
    """Partitions the training set into the N clients' padded arrays (host numpy)."""
    rng = np.random.default_rng(c.data.partition_seed)
    if c.data.partition == "iid":
        indices = data.partition_iid(len(dataset.y_train), c.num_clients, c.batch_size, rng)
        count = None
    else:
        indices, count = data.partition_dirichlet(
            dataset.y_train, c.num_clients, c.data.dirichlet_alpha, rng, dataset.spec.num_classes
        )
    return data.make_client_data(dataset.x_train, dataset.y_train, indices, count)


def root_data(c: ml_collections.ConfigDict, dataset: data.Dataset) -> simulation.ClientData:
    """The server's small clean root set (FLTrust), as one client's arrays [1, n, ...]."""
    size = int(c.defense.get("root_size", 100))
    rng = np.random.default_rng([c.data.partition_seed, 1])
    idx = rng.choice(len(dataset.y_train), size, replace=False)
    return simulation.ClientData(
        jnp.asarray(dataset.x_train[idx][None]),
        jnp.asarray(dataset.y_train[idx][None]),
        jnp.asarray([size], jnp.int32),
    )


def setup(c: ml_collections.ConfigDict) -> Setup:
    """Validates the config, loads the data onto the device and builds the compiled round."""
    configuration.validate(c)
    exps = experiments.expand(c)
    spec = data.SPECS[c.dataset]
    dataset = data.load_dataset(
        c.dataset,
        c.data.source,
        c.data.dir or None,
        synthetic_sizes=(c.data.synthetic_train, c.data.synthetic_test),
        seed=c.data.partition_seed,
    )
    logging.info(
        "data: %s from %s, %d train / %d test",
        spec.name,
        dataset.source,
        len(dataset.y_train),
        len(dataset.y_test),
    )
    mesh_clients = c.mesh.clients or sharding.auto_clients(c.mesh.experiments, c.clients_per_round)
    mesh = sharding.make_mesh(c.mesh.experiments, mesh_clients)
    group_size = len(experiment_groups(len(exps), c.sweep.max_parallel, c.mesh.experiments)[0])
    sharding.check_shapes(mesh, group_size, c.clients_per_round)
    host_clients = build_client_data(c, dataset)
    client_data = sharding.replicated(mesh, simulation.ClientData(*host_clients))
    test = metrics.TestSet(dataset.x_test, dataset.y_test, c.eval_batch_size)

    model_kwargs = dict(conv_impl=conv_impl(c.model.conv_impl))
    if c.model.name == "cifar10_cnn":
        model_kwargs["softmax_output"] = c.model.softmax_output
    model = models.make_model(c.model.name, **model_kwargs)
    params, _ = models.init_variables(model, jax.random.key(0), spec.image_shape)
    head = params[models.HEAD]["kernel"]  # [F, C]
    head_positions = simulation.head_index(params)
    defense_by_name = {
        name: defenses.make_defense(
            _with_name(c.defense, name),
            num_clients=c.num_clients,
            clients_per_round=c.clients_per_round,
            num_params=models.count_params(params),
            num_classes=spec.num_classes,
            head_features=head.shape[0],
        )
        for name in experiments.defense_set(exps)
    }
    attack_by_name = {
        name: attacks.make_attack(
            name,
            c.attack,
            num_classes=spec.num_classes,
            image_shape=spec.image_shape,
            clients_per_round=c.clients_per_round,
            head_index=head_positions,
        )
        for name in experiments.attack_set(exps)
    }
    defense_set = list(defense_by_name.values())
    defense = defenses.select(defense_set, 0)
    trigger = next((a.trigger for a in attack_by_name.values() if a.trigger), None)
    local_train = client.make_local_train(
        model,
        spec,
        client.TrainSettings(c.batch_size, c.local_epochs, c.momentum, c.augment),
        devices_in_use=sharding.local_devices(mesh),
    )
    round_step = simulation.make_round_step(
        local_train,
        defense_set,
        list(attack_by_name.values()),
        simulation.RoundSettings(
            c.clients_per_round,
            c.lr,
            c.lr_decay_factor,
            c.lr_decay_every,
            c.min_lr,
            c.lr_per_participation,
            c.save_features,
            sharding.client_groups(mesh),
        ),
        head_positions,
        root_data(c, dataset) if defense.needs_root else None,
        sharding.client_constraint(mesh),
        sharding.replicated_constraint(mesh),
    )
    evaluate = metrics.make_evaluate(
        model,
        spec,
        sharding.client_groups(mesh),
        sharding.client_constraint(mesh),
        devices_in_use=sharding.local_devices(mesh),
    )
    advance = jax.jit(
        simulation.make_advance(
            round_step,
            evaluate,
            c.eval_every,
            c.clients_per_round,
            sharding.spmd_axis(mesh),
            head.shape[0] if c.save_features else 0,
            experiment_shards=sharding.experiment_shards(mesh),
            trigger=trigger,
        ),
        donate_argnums=0,
        compiler_options=compiler_options(),
    )
    init_one = lambda seed: simulation.init_state(
        lambda key: models.init_variables(model, key, spec.image_shape),
        defense,
        seed,
        c.num_clients,
    )
    scenarios = experiments.stack(
        [experiments.scenario(e, c, spec.num_classes, exps) for e in exps]
    )
    return Setup(
        spec=spec,
        experiments=exps,
        client_data=client_data,
        test=sharding.replicated(mesh, (test.x, test.y, test.mask)),
        advance=advance,
        init_states=jax.jit(jax.vmap(init_one)),
        scenarios=scenarios,
        mesh=mesh,
        defense=defense,
        flags_clients=[defense_by_name[e.defense].flags_clients for e in exps],
        attack_of=[attack_by_name[e.attack] for e in exps],
        examples_per_round=int(np.mean(host_clients.count)) * c.clients_per_round * c.local_epochs,
    )


def _with_name(cfg: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
    """A copy of a config block with its `name` replaced."""
    other = ml_collections.ConfigDict(cfg.to_dict())
    other.name = name
    return other


def evaluation_rows(
    s: Setup, members, round_done: int, confusion, records, detected, degenerate
) -> list:
    """One metrics row per experiment of a group, for the evaluation after `round_done` rounds.

    members: the group's experiment indices; confusion [G, V, C, C]; records [G, rounds, k];
    detected [G, 4]: the run's cumulative (tp, fp, fn, tn) of the defense's flags;
    degenerate [G]: rounds so far in which the rule kept nobody or one client.
    """
    rows = []
    for g, e in enumerate(members):
        if members.index(e) != g:  # padding of the last group
            continue
        exp = s.experiments[e]
        row = {"round": round_done}
        if len(s.experiments) > 1:
            row["experiment"] = e
            row.update({k: list(v) if isinstance(v, tuple) else v for k, v in exp.axes.items()})
        attack = s.attack_of[e]
        row.update(metrics.summarize(confusion[g, 0], exp.flips))
        if attack.measure == "backdoor":
            row["attack_success_rate"] = metrics.backdoor_success(confusion[g, 1], attack.target)
        row["malicious_selected"] = int(records.malicious[g, -1].sum())
        row["poisoned_selected"] = int(records.poisoned[g, -1].sum())
        row["loss"] = float(records.loss[g, -1].mean())
        row["degenerate_rounds"] = int(degenerate[g])
        if s.flags_clients[e]:
            tp, fp, fn, tn = (int(v) for v in detected[g])
            row["flagged"] = int(records.flags[g, -1].sum())
            row["detection"] = {"tp": tp, "fp": fp, "fn": fn, "tn": tn}
            row["detection_precision"] = tp / max(tp + fp, 1)
            row["detection_recall"] = tp / max(tp + fn, 1)
        rows.append(row)
    return rows


def experiment_groups(
    num_experiments: int, max_parallel: int, multiple: int = 1
) -> list[list[int]]:
    """Experiment indices in groups of at most max_parallel (0 = all), padded to equal size.

    Padding repeats the group's last experiment; its duplicate rows are dropped, and equal
    sizes keep every group on the one compiled program. Sizes round up to a multiple of
    `multiple` (the devices of the experiment axis).
    """
    size = min(max_parallel or num_experiments, num_experiments)
    size = -(-size // multiple) * multiple
    groups = [
        list(range(i, min(i + size, num_experiments))) for i in range(0, num_experiments, size)
    ]
    return [g + [g[-1]] * (size - len(g)) for g in groups]


def _write_run_files(
    c: ml_collections.ConfigDict, s: Setup, workdir: str, resumed: bool = False
) -> None:
    os.makedirs(workdir, exist_ok=True)
    report.write_json(os.path.join(workdir, "config.json"), c.to_dict())
    checkpoint.write_environment(workdir, resumed)
    malicious = np.asarray(s.scenarios.malicious)
    report.write_json(
        os.path.join(workdir, "malicious.json"),
        [
            {"experiment": e, **exp.axes, "malicious_clients": np.flatnonzero(m).tolist()}
            for e, (exp, m) in enumerate(zip(s.experiments, malicious))
        ],
    )


def train_and_evaluate(c: ml_collections.ConfigDict, workdir: str) -> dict | None:
    """Runs every experiment of the config for c.num_rounds rounds; writes the workdir files.

    The same call with the same workdir resumes from the last checkpoint (see
    c.checkpoint_every); a finished run only writes its summary and plots again. In a
    multi-host run (sharding.initialize_distributed), every process calls it with the same
    config and a workdir on a shared file system; process 0 writes the files and returns the
    summary, the others return None.
    """
    configuration.validate(c)
    primary = sharding.is_primary()
    checkpoint.claim_workdir(c, workdir, clear=primary)
    sharding.barrier("claim_workdir")
    s = setup(c)
    groups = experiment_groups(len(s.experiments), c.sweep.max_parallel, c.mesh.experiments)
    os.makedirs(workdir, exist_ok=True)
    checkpoints = checkpoint.Checkpoints(workdir)
    try:
        start = checkpoints.latest()
        metrics_path = os.path.join(workdir, "metrics.jsonl")
        if primary:
            _write_run_files(c, s, workdir, resumed=start is not None)
            checkpoint.restart_metrics(metrics_path, start, len(groups[0]))
        if start is not None and (start.group, start.round) == (len(groups) - 1, c.num_rounds):
            logging.info("%s holds a finished run: writing its summary again", workdir)
            compile_s, train_s = start.compile_s, start.train_s
        else:
            compile_s, train_s = _train(c, s, groups, checkpoints, start, metrics_path)
    finally:
        checkpoints.close()
    if not primary:
        return None

    # Reports come from the file, the same whether the run was interrupted or not.
    rows = report.read_lines(metrics_path)
    total = len(groups) * c.num_rounds
    summary = {
        "num_rounds": c.num_rounds,
        "num_experiments": len(s.experiments),
        "compile_s": compile_s,
        "train_and_eval_s": train_s,
        "rounds_per_s": total / train_s,  # rounds of a whole experiment group
        "experiment_rounds_per_s": c.num_rounds * len(s.experiments) / train_s,
        "examples_per_s": c.num_rounds * len(s.experiments) * s.examples_per_round / train_s,
        "final": [r for r in rows if r["round"] == c.num_rounds],
    }
    summary["diverged"] = [
        {"experiment": r.get("experiment", 0), "round": r["diverged_round"]}
        for r in summary["final"]
        if r.get("diverged")
    ]
    flagging = [r for r in summary["final"] if "detection_precision" in r]
    for key in ("detection_precision", "detection_recall") if flagging else ():
        summary[key] = float(np.mean([r[key] for r in flagging]))
    summary["degenerate_rounds"] = [r["degenerate_rounds"] for r in summary["final"]]
    for r in summary["final"]:
        if r["degenerate_rounds"] > max(2, c.num_rounds // 20):
            logging.warning(
                "experiment %d: the defense kept at most one client in %d of %d rounds "
                "(degenerate_rounds in metrics.jsonl): its results say little about the rule",
                r.get("experiment", 0),
                r["degenerate_rounds"],
                c.num_rounds,
            )
    report.write_json(os.path.join(workdir, "summary.json"), summary)
    report.plot_curves(
        rows,
        [experiments.label(e) for e in s.experiments],
        os.path.join(workdir, "curves.png"),
        f"{c.dataset}: {len(s.experiments)} experiment(s)",
    )
    tables.write_sweep_report(workdir, rows, s.experiments, c)
    return summary


class _Run(NamedTuple):
    """What every chunk of a run's loop shares."""

    c: ml_collections.ConfigDict
    s: Setup
    compiled: Any  # advance, compiled for one group's shapes
    checkpoints: checkpoint.Checkpoints
    metrics_path: str
    num_groups: int


def _train(c, s: Setup, groups, checkpoints, start, metrics_path) -> tuple[float, float]:
    """Runs the groups from `start` (a checkpoint's Progress, or None) to the end.

    Returns (compile_s, train_s).
    """
    seeds = np.asarray([e.seed for e in s.experiments], np.int32)
    t0 = time.perf_counter()
    like = _place(s, s.init_states(jnp.asarray(seeds[groups[0]])))
    compiled = s.advance.lower(
        like,
        _place(s, _pick(s.scenarios, groups[0])),
        s.client_data,
        s.test,
        jnp.int32(c.eval_every),
    ).compile()
    compile_s = time.perf_counter() - t0
    run = _Run(c, s, compiled, checkpoints, metrics_path, len(groups))

    carry = None
    if start is None:
        progress = checkpoint.Progress(0, 0, 0, 0.0, compile_s)
    elif start.round < c.num_rounds:
        carry = checkpoints.restore(start, like, c.num_rounds)
        carry = carry._replace(states=_place(s, carry.states))
        progress = start._replace(compile_s=compile_s)
    else:  # the checkpoint ends a group: go on with the next one
        progress = start._replace(group=start.group + 1, round=0, compile_s=compile_s)
    if start is not None:
        logging.info("resuming at round %d of experiment group %d", progress.round, progress.group)
    for index in range(progress.group, len(groups)):
        members = groups[index]
        if carry is None:
            carry = checkpoint.Carry(
                _place(s, s.init_states(jnp.asarray(seeds[members]))),
                np.zeros((len(members), 4), np.int64),
                np.zeros(len(members), np.int32),
                np.zeros(len(members), np.int32),
            )
        progress = _run_group(run, members, carry, progress._replace(group=index))
        carry, progress = None, progress._replace(round=0)
    return compile_s, progress.train_s


def _run_group(run: _Run, members: list, carry: checkpoint.Carry, progress):
    """Advances one group of experiments from progress.round to the end, chunk by chunk.

    Writes each chunk's metrics rows, then checkpoints where due; returns the progress.
    """
    c, s = run.c, run.s
    primary = sharding.is_primary()
    scenarios = _place(s, _pick(s.scenarios, members))
    while progress.round < c.num_rounds:
        before = progress.round
        todo = min(c.eval_every, c.num_rounds - before)
        t = time.perf_counter()
        states, records, confusion = run.compiled(
            carry.states, scenarios, s.client_data, s.test, jnp.int32(todo)
        )
        records, confusion = sharding.to_host((records, confusion))
        elapsed = time.perf_counter() - t
        progress = progress._replace(round=before + todo, train_s=progress.train_s + elapsed)
        records = jax.tree.map(lambda r, n=todo: r[:, :n], records)
        carry = _account(s, members, carry, states, records, before)
        if c.save_features and primary:
            _save_features(os.path.dirname(run.metrics_path), members, before, records)
        rows = evaluation_rows(
            s, members, progress.round, confusion, records, carry.detected, carry.degenerate
        )
        for row in rows:
            diverged = int(carry.diverged[members.index(row.get("experiment", members[0]))])
            row["diverged"] = diverged > 0
            if diverged:
                row["diverged_round"] = diverged
        if primary:
            report.append_lines(run.metrics_path, rows)
        progress = progress._replace(lines=progress.lines + len(rows))
        if len(s.experiments) == 1 and carry.diverged[0]:
            raise DivergenceError(
                f"experiment 0 diverged in round {carry.diverged[0]}: a non-finite loss or "
                f"parameter (lower lr or momentum?); metrics up to round {progress.round} "
                f"are in {run.metrics_path}"
            )
        done, total = progress.group * c.num_rounds + progress.round, run.num_groups * c.num_rounds
        if primary:
            logging.info(report.format_progress(done, total, done / progress.train_s, rows[0]))
        if _checkpoint_due(c, progress.round, progress.group == run.num_groups - 1):
            run.checkpoints.save(progress, carry, c.num_rounds)
    return progress


def _save_features(workdir: str, members: list, round_before: int, records) -> None:
    """Writes one chunk's per-(round, client) feature rows to features/r{round}_e{first}.npz.

    A resumed run writes a chunk again with the same content, so no clean-up is needed.
    """
    keep = [g for g, e in enumerate(members) if members.index(e) == g]
    folder = os.path.join(workdir, "features")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"r{round_before:05d}_e{members[0]:04d}.npz")
    rounds = round_before + np.arange(records.selected.shape[1])
    tmp = path + ".tmp.npz"
    np.savez(
        tmp,
        experiment=np.asarray(members)[keep],  # [G]
        round=rounds,  # [R], 0-based
        client=records.selected[keep],  # [G, R, k]
        malicious=records.malicious[keep],
        flagged=records.flags[keep],
        features=records.features[keep],  # [G, R, k, F]
        sign=records.feature_sign[keep],
    )
    os.replace(tmp, path)


def _place(s: Setup, tree):
    """Puts a group's [G] pytree on the device(s), split over the experiment axis."""
    return sharding.by_experiment(s.mesh, tree)


def _pick(tree, members):
    return jax.tree.map(lambda a: a[np.asarray(members)], tree)


def _account(s: Setup, members, carry, states, records, round_before: int):
    """The carry after a chunk: new states, detection counts, and divergence [G]."""
    detected = carry.detected
    if s.defense.flags_clients:
        g = len(detected)
        detected = detected + np.asarray(
            jax.vmap(defenses.detection_counts)(
                records.flags.reshape(g, -1), records.malicious.reshape(g, -1)
            )
        )
    degenerate = carry.degenerate + np.asarray(records.degenerate).sum(1)
    finite = np.asarray(records.finite)  # [G, rounds of the chunk]
    new = ~finite.all(1) & (carry.diverged == 0)
    for g in np.flatnonzero(new):
        if members.index(members[g]) == g:  # not the padding of the last group
            logging.warning(
                "experiment %d diverged in round %d: non-finite loss or parameters",
                members[g],
                round_before + int(np.argmin(finite[g])) + 1,
            )
    diverged = np.where(new, round_before + np.argmin(finite, 1) + 1, carry.diverged)
    return checkpoint.Carry(
        states, detected, diverged.astype(np.int32), degenerate.astype(np.int32)
    )


def _checkpoint_due(c: ml_collections.ConfigDict, round_done: int, last_group: bool) -> bool:
    if round_done == c.num_rounds and (c.checkpoint_every or last_group):
        return True  # the end of a group, or of the run
    return bool(c.checkpoint_every) and round_done % c.checkpoint_every == 0
