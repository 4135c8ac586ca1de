"""A validated config turned into plain data, once: the only reader of a ConfigDict past
validation. Everything below (setup, the run loop, the writer) takes a `Plan`."""

import dataclasses

from fedjax_poison import data, models
from fedjax_poison.config import configuration, experiments, window
from fedjax_poison.round import client


@dataclasses.dataclass(frozen=True)
class DataSettings:
    source: str  # auto | tfds | files | synthetic
    dir: str | None
    partition: str  # a name of data.partition.PARTITIONS
    partition_block: dict  # its block `data.<partition>.*`
    partition_seed: int
    synthetic_sizes: tuple[int, int]  # (train, test)


@dataclasses.dataclass(frozen=True)
class LrSchedule:
    """The paper's step schedule: lr * decay_factor ** (step // decay_every), >= min_lr."""

    lr: float
    decay_factor: float
    decay_every: int
    min_lr: float
    per_participation: bool  # the step counts a client's rounds (the original code's quirk)


@dataclasses.dataclass(frozen=True)
class Plan:
    """Everything a run needs from its config, as plain values."""

    config: dict  # the validated config, as written to config.json
    spec: data.DatasetSpec
    data: DataSettings
    model: dict  # the model's spec: {'name': ..., its fields}
    num_clients: int
    clients_per_round: int
    num_rounds: int
    train: client.TrainSettings
    clients_at_once: int  # clients a device trains at once; 0: automatic
    lr: LrSchedule
    attack: dict  # the `attack.` block (each attack's parameters)
    defense: dict  # the `defense.` block
    window: experiments.Window  # the rounds in which attackers poison
    experiments: tuple[experiments.Experiment, ...]
    clean_twins: tuple[int | None, ...]  # [E]
    measured_flips: tuple[tuple, ...]  # [E] the pairs each row's source measures are read on
    # experiments run at once, padded to equal size; the members of a group share their
    # attack and their defense (each experiment computes only its own)
    groups: tuple[tuple[int, ...], ...]
    eval_every: int
    eval_batch_size: int
    eval_window: int  # evaluations in the stable measures
    checkpoint_every: int
    save_features: bool
    overwrite: bool
    tensorboard: bool
    mesh_clients: int  # 0: automatic
    mesh_experiments: int


def build(c) -> Plan:
    """Validates the config and turns it into a Plan; raises ConfigError naming a field."""
    configuration.validate(c)
    exps = experiments.expand(c)
    twins = experiments.clean_twins(exps, c)
    end = c.num_rounds if c.attack.end_round == -1 else min(c.attack.end_round, c.num_rounds)
    return Plan(
        config=c.to_dict(),
        spec=data.SPECS[c.dataset],
        data=DataSettings(
            c.data.source,
            c.data.dir or None,
            c.data.partition,
            c.data[c.data.partition].to_dict() if c.data.partition in c.data else {},
            c.data.partition_seed,
            (c.data.synthetic_train, c.data.synthetic_test),
        ),
        model=models.spec_of(c.model.to_dict()),
        num_clients=c.num_clients,
        clients_per_round=c.clients_per_round,
        num_rounds=c.num_rounds,
        train=client.TrainSettings(
            c.batch_size, c.local_epochs, c.momentum, c.augment, local_steps=c.local_steps
        ),
        clients_at_once=c.clients_at_once,
        lr=LrSchedule(c.lr, c.lr_decay_factor, c.lr_decay_every, c.min_lr, c.lr_per_participation),
        attack=c.attack.to_dict(),
        defense=c.defense.to_dict(),
        window=experiments.Window(c.attack.start_round, end, c.attack.every),
        experiments=tuple(exps),
        clean_twins=tuple(twins),
        measured_flips=tuple(experiments.measured_flips(exps, twins)),
        groups=tuple(
            tuple(g)
            for g in experiment_groups(
                len(exps), c.sweep.max_parallel, c.mesh.experiments, cells=rule_cells(exps)
            )
        ),
        eval_every=c.eval_every,
        eval_batch_size=c.eval_batch_size,
        eval_window=eval_window(c.eval_window, c.num_rounds, c.eval_every),
        checkpoint_every=c.checkpoint_every,
        save_features=c.save_features,
        overwrite=c.overwrite,
        tensorboard=c.tensorboard,
        mesh_clients=c.mesh.clients,
        mesh_experiments=c.mesh.experiments,
    )


def eval_window(configured: int, num_rounds: int, eval_every: int) -> int:
    """Evaluations in the stable measures: config.window.window_size, the one definition
    the metrics rows, summary.json and every table share."""
    config = {"eval_window": configured, "num_rounds": num_rounds, "eval_every": eval_every}
    return window.window_size(config, [])


def rule_cells(exps) -> list[tuple[str, str]]:
    """[E] each experiment's (attack, defense): experiments of two cells never share a group."""
    return [(e.attack, e.defense) for e in exps]


def experiment_groups(
    num_experiments: int, max_parallel: int, multiple: int = 1, cells=None
) -> list[list[int]]:
    """Experiment indices in groups of at most max_parallel (0 = all), padded to equal size.

    cells: [E] a key per experiment (its attack and defense); a group holds one key only,
    so that the round picks the group's attack and defense once for all its members instead
    of computing every one of the run's set for each (simulation.make_advance). Groups
    follow the cells in order of first appearance, each cell's experiments in order.

    Padding repeats the group's last experiment; its duplicate rows are dropped, and equal
    sizes keep every group on the one compiled program. The size is the smallest that runs
    every cell in as few groups as max_parallel allows (a cell of 9 and one of 3 at
    max_parallel 8: groups of 5, 4 and 3 padded to 5, not 8, 1 and 3 padded to 8), rounded
    up to a multiple of `multiple` (the devices of the experiment axis).
    """
    cells = [0] * num_experiments if cells is None else list(cells)
    by_cell: dict = {}
    for e, cell in enumerate(cells):
        by_cell.setdefault(cell, []).append(e)
    ceil_div = lambda a, b: -(-a // b)
    round_up = lambda n: ceil_div(n, multiple) * multiple
    largest = max(len(members) for members in by_cell.values())
    cap = round_up(min(max_parallel or largest, largest))  # the widest a group may be
    # each cell in ceil(n / cap) groups, as even as they come; the widest sets the size
    size = round_up(max(ceil_div(len(m), ceil_div(len(m), cap)) for m in by_cell.values()))
    groups = [
        members[i : i + size] for members in by_cell.values() for i in range(0, len(members), size)
    ]
    return [g + [g[-1]] * (size - len(g)) for g in groups]


def members(group: tuple[int, ...]) -> list[tuple[int, int]]:
    """(slot, experiment) of a group's real members: padding slots left out."""
    return [(g, e) for g, e in enumerate(group) if group.index(e) == g]
