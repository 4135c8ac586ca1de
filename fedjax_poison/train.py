"""train_and_evaluate(config, workdir): one run (or one sweep) from config to workdir files."""

import dataclasses
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from fedjax_poison import (
    client,
    configuration,
    data,
    defenses,
    experiments,
    metrics,
    models,
    report,
    simulation,
)


@dataclasses.dataclass(frozen=True)
class Setup:
    """Everything a run builds from its config before the first round."""

    spec: data.DatasetSpec
    experiments: list
    client_data: simulation.ClientData  # on device
    test: tuple  # (x, y, mask) batched, on device
    advance: object  # jitted advance(states, scenarios, data, test, num_rounds)
    init_states: object  # seeds [E] -> ServerState [E]
    scenarios: simulation.Scenario  # [E], on device
    defense: defenses.Defense
    examples_per_round: int


def conv_impl(name: str) -> str:
    """'auto' picks im2col on CPU (see models.Conv) and XLA's convolution elsewhere."""
    if name != "auto":
        return name
    return "im2col" if jax.default_backend() == "cpu" else "xla"


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
    host_clients = build_client_data(c, dataset)
    client_data = jax.device_put(simulation.ClientData(*host_clients))
    test = metrics.TestSet(dataset.x_test, dataset.y_test, c.eval_batch_size)

    model_kwargs = dict(conv_impl=conv_impl(c.model.conv_impl))
    if c.model.name == "cifar10_cnn":
        model_kwargs["softmax_output"] = c.model.softmax_output
    model = models.make_model(c.model.name, **model_kwargs)
    params, _ = models.init_variables(model, jax.random.key(0), spec.image_shape)
    head = params[models.HEAD]["kernel"]  # [F, C]
    defense = defenses.make_defense(
        c.defense,
        num_clients=c.num_clients,
        clients_per_round=c.clients_per_round,
        num_params=models.count_params(params),
        num_classes=spec.num_classes,
        head_features=head.shape[0],
    )
    local_train = client.make_local_train(
        model,
        spec,
        client.TrainSettings(c.batch_size, c.local_epochs, c.momentum, c.augment),
    )
    round_step = simulation.make_round_step(
        local_train,
        defense,
        simulation.RoundSettings(
            c.clients_per_round,
            c.lr,
            c.lr_decay_factor,
            c.lr_decay_every,
            c.min_lr,
            c.lr_per_participation,
        ),
        root_data(c, dataset) if defense.needs_root else None,
    )
    evaluate = metrics.make_evaluate(model, spec)
    advance = jax.jit(
        simulation.make_advance(round_step, evaluate, c.eval_every, c.clients_per_round),
        donate_argnums=0,
    )
    init_one = lambda seed: simulation.init_state(
        lambda key: models.init_variables(model, key, spec.image_shape),
        defense,
        seed,
        c.num_clients,
    )
    scenarios = experiments.stack([experiments.scenario(e, c, spec.num_classes) for e in exps])
    return Setup(
        spec=spec,
        experiments=exps,
        client_data=client_data,
        test=(test.x, test.y, test.mask),
        advance=advance,
        init_states=jax.jit(jax.vmap(init_one)),
        scenarios=jax.device_put(scenarios),
        defense=defense,
        examples_per_round=int(np.mean(host_clients.count)) * c.clients_per_round * c.local_epochs,
    )


def evaluation_rows(s: Setup, members, round_done: int, confusion, records, detected) -> list:
    """One metrics row per experiment of a group, for the evaluation after `round_done` rounds.

    members: the group's experiment indices; confusion [G, C, C]; records [G, rounds, k];
    detected [G, 4]: the run's cumulative (tp, fp, fn, tn) of the defense's flags.
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
        row.update(metrics.summarize(confusion[g], exp.flips))
        row["malicious_selected"] = int(records.malicious[g, -1].sum())
        row["poisoned_selected"] = int(records.poisoned[g, -1].sum())
        row["loss"] = float(records.loss[g, -1].mean())
        if s.defense.flags_clients:
            tp, fp, fn, tn = (int(v) for v in detected[g])
            row["flagged"] = int(records.flags[g, -1].sum())
            row["detection"] = {"tp": tp, "fp": fp, "fn": fn, "tn": tn}
            row["detection_precision"] = tp / max(tp + fp, 1)
            row["detection_recall"] = tp / max(tp + fn, 1)
        rows.append(row)
    return rows


def experiment_groups(num_experiments: int, max_parallel: int) -> list[list[int]]:
    """Experiment indices in groups of at most max_parallel (0 = all), padded to equal size.

    Padding repeats the group's last experiment; its duplicate rows are dropped, and equal
    sizes keep every group on the one compiled program.
    """
    size = max_parallel or num_experiments
    size = min(size, num_experiments)
    groups = [
        list(range(i, min(i + size, num_experiments))) for i in range(0, num_experiments, size)
    ]
    return [g + [g[-1]] * (size - len(g)) for g in groups]


def _write_run_files(c: ml_collections.ConfigDict, s: Setup, workdir: str) -> None:
    os.makedirs(workdir, exist_ok=True)
    report.write_json(os.path.join(workdir, "config.json"), c.to_dict())
    malicious = np.asarray(s.scenarios.malicious)
    report.write_json(
        os.path.join(workdir, "malicious.json"),
        [
            {"experiment": e, **exp.axes, "malicious_clients": np.flatnonzero(m).tolist()}
            for e, (exp, m) in enumerate(zip(s.experiments, malicious))
        ],
    )


def train_and_evaluate(c: ml_collections.ConfigDict, workdir: str) -> dict:
    """Runs every experiment of the config for c.num_rounds rounds; writes the workdir files."""
    s = setup(c)
    _write_run_files(c, s, workdir)
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    report.write_text(metrics_path, "")
    groups = experiment_groups(len(s.experiments), c.sweep.max_parallel)
    seeds = np.asarray([e.seed for e in s.experiments], np.int32)
    pick = lambda tree, members: jax.tree.map(lambda a: a[np.asarray(members)], tree)

    t0 = time.perf_counter()
    states = s.init_states(jnp.asarray(seeds[groups[0]]))
    compiled = s.advance.lower(
        states, pick(s.scenarios, groups[0]), s.client_data, s.test, jnp.int32(c.eval_every)
    ).compile()
    compile_s = time.perf_counter() - t0

    rows, train_s, total = [], 0.0, len(groups) * c.num_rounds
    for index, members in enumerate(groups):
        states = s.init_states(jnp.asarray(seeds[members]))
        scenarios = pick(s.scenarios, members)
        detected = np.zeros((len(members), 4), np.int64)
        round_done = 0
        while round_done < c.num_rounds:
            todo = min(c.eval_every, c.num_rounds - round_done)
            t = time.perf_counter()
            states, records, confusion = compiled(
                states, scenarios, s.client_data, s.test, jnp.int32(todo)
            )
            records, confusion = jax.device_get((records, confusion))
            train_s += time.perf_counter() - t
            records = jax.tree.map(lambda r, n=todo: r[:, :n], records)
            round_done += todo
            if s.defense.flags_clients:
                detected += np.asarray(
                    jax.vmap(defenses.detection_counts)(
                        records.flags.reshape(len(members), -1),
                        records.malicious.reshape(len(members), -1),
                    )
                )
            new_rows = evaluation_rows(s, members, round_done, confusion, records, detected)
            report.append_lines(metrics_path, new_rows)
            rows.extend(new_rows)
            done = index * c.num_rounds + round_done
            logging.info(report.format_progress(done, total, done / train_s, new_rows[0]))

    summary = {
        "num_rounds": c.num_rounds,
        "num_experiments": len(s.experiments),
        "compile_s": compile_s,
        "train_and_eval_s": train_s,
        "rounds_per_s": total / train_s,
        "examples_per_s": total * len(groups[0]) * s.examples_per_round / train_s,
        "final": [r for r in rows if r["round"] == c.num_rounds],
    }
    if s.defense.flags_clients:
        for key in ("detection_precision", "detection_recall"):
            summary[key] = float(np.mean([r[key] for r in summary["final"]]))
    report.write_json(os.path.join(workdir, "summary.json"), summary)
    report.plot_curves(
        rows,
        [experiments.label(e) for e in s.experiments],
        os.path.join(workdir, "curves.png"),
        f"{c.dataset}: {len(s.experiments)} experiment(s)",
    )
    return summary
