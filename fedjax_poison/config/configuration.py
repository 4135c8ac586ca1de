"""The configuration of a run: its defaults, and the one validation every run goes through.

A config is an `ml_collections.ConfigDict`. `paper_config(dataset)` builds the default one
from the dataset's spec (its model and training recipe, `data.SPECS`), the attack and
defense registries' blocks and the sweep axes; config files in configs/ start from it.
`validate` checks every field once, before anything is loaded or compiled: a bad value
stops with one line naming the field (and, for an unknown field, the closest valid one).
Below `plan.build`, nothing reads a ConfigDict.

Rounds are numbered from 1 to num_rounds everywhere: in these fields, in logs, in
metrics.jsonl and in every file of a run.
"""

import difflib
import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fedjax_poison import attacks, data, defenses, models
from fedjax_poison.config import sweeps
from fedjax_poison.config.fields import (
    ConfigError,
    check,
    is_int,
    is_number,
    validate_attack_name,
    validate_defense_name,
    validate_flips,
)
from fedjax_poison.data import partition
from fedjax_poison.registry import RegistryError
from fedjax_poison.round import selection

__all__ = ["SWEEP_AXES", "ConfigError", "paper_config", "smoke", "validate", "variant"]
SWEEP_AXES = tuple(sweeps.AXES)
MAX_TIMEOUT_S = 86400  # distributed.timeout_s: a day


def paper_config(dataset: str) -> ml_collections.ConfigDict:
    """One experiment on `dataset` as the paper runs it: 50 clients, 5 per round, 200 rounds,
    the dataset's model and training recipe, nobody malicious (set attack.*)."""
    if dataset not in data.SPECS:
        raise ConfigError(f"dataset must be one of {sorted(data.SPECS)}, got {dataset!r}")
    recipe = data.SPECS[dataset].recipe
    c = ml_collections.ConfigDict()
    c.dataset = dataset
    model = dict(recipe["model"])
    c.model = models.default_config(model.pop("name"), **model)
    c.data = ml_collections.ConfigDict(
        dict(
            source="auto",  # auto | tfds | files | synthetic
            dir="",  # '' = the source's default (TFDS_DATA_DIR, or the spec's default_dir)
            partition="iid",  # a partition: iid (the paper's round-robin), dirichlet, shards
            partition_seed=0,  # the split is shared by every experiment of a sweep
            synthetic_train=6000,
            synthetic_test=1000,
        )
    )
    for name in partition.PARTITIONS:  # their blocks: data.dirichlet.alpha, ...
        if partition.PARTITIONS.block(name):
            c.data[name] = ml_collections.ConfigDict(partition.PARTITIONS.block(name))
    c.num_clients = 50
    c.clients_per_round = 5
    c.num_rounds = 200
    c.local_epochs = 1
    # > 0: every selected client trains exactly this many batches of batch_size a round,
    # passing over its examples as often as needed (cross-device convention); 0: local_epochs.
    c.local_steps = 0
    # Clients a device trains at once (0: automatic: on CPU as many as fit the cache, on an
    # accelerator all the round's). Unequal clients train longest first, so that each group
    # stops with its own largest client.
    c.clients_at_once = 0
    for field in ("batch_size", "lr", "momentum", "lr_decay_factor", "lr_decay_every", "augment"):
        c[field] = recipe[field]
    c.min_lr = 1e-10
    c.lr_per_participation = False  # True: the original code's per-client schedule
    c.seed = 0
    c.eval_every = 1
    c.eval_batch_size = 1000
    # Evaluations averaged into the stable measures (the mean over the last W evaluations);
    # 0: those of the last 10% of the rounds.
    c.eval_window = 0
    c.save_features = False  # features/*.npz: per (round, client) rows for the PCA analysis
    # Rounds between checkpoints, a multiple of eval_every; 0 = automatic: after the first
    # evaluation 10 minutes after the last save (train.AUTO_CHECKPOINT_S). The same command
    # resumes from the last one; the end of each experiment group is always saved.
    c.checkpoint_every = 0
    c.overwrite = False  # True: replace a workdir's run of another config instead of refusing
    c.tensorboard = True  # TensorBoard event files in workdir/tensorboard (needs tensorboardX)
    c.attack = attacks.default_config(recipe["flips"])
    c.selection = ml_collections.ConfigDict(
        # early: malicious clients may train only in rounds before the breakpoint; late:
        # only from it on. availability: each of the k slots is malicious w.p. alpha
        # (alpha_after from the breakpoint on; -1 = alpha).
        dict(schedule="always", breakpoint=75, alpha=0.5, alpha_after=-1.0)
    )
    c.defense = defenses.default_config()
    c.sweep = ml_collections.ConfigDict({axis: () for axis in sweeps.AXES})
    c.sweep.mode = "product"  # product | zip
    c.sweep.max_parallel = 0  # experiments run at once (of one attack and defense); 0 = all
    # Devices for the experiment axis of a sweep and for the clients of a round;
    # clients=0: all devices the experiments axis leaves (on CPU, one per core), at most k.
    # cpu_devices: jax devices on a CPU, 0 = one per core.
    c.mesh = ml_collections.ConfigDict(dict(clients=0, experiments=1, cpu_devices=0))
    # Several hosts: coordinator "host:port" (or "auto" on TPU pods and SLURM); see BUILD.md.
    # timeout_s: how long a process waits for the coordinator and the others to join.
    c.distributed = ml_collections.ConfigDict(
        dict(coordinator="", num_processes=1, process_id=0, timeout_s=300)
    )
    return c


def smoke(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A variant that runs in about a minute on a laptop CPU: synthetic data, few rounds."""
    c.data.source = "synthetic"
    c.data.synthetic_train, c.data.synthetic_test = 2000, 500
    c.num_clients, c.clients_per_round, c.num_rounds = 10, 4, 6
    c.eval_every = 2
    c.attack.malicious_fraction = 0.3
    return c


def variant(c: ml_collections.ConfigDict, arg: str | None, path: str) -> ml_collections.ConfigDict:
    """The config file's variant named by `arg` (`--config=path:arg`): none, or 'smoke'."""
    if arg == "smoke":
        return smoke(c)
    if arg:
        raise ConfigError(f"unknown variant {arg!r}: use --config={path} or {path}:smoke")
    return c


def reference(c) -> ml_collections.ConfigDict:
    """The defaults `c` is checked against: its dataset's paper config."""
    return paper_config(c.dataset)


def unknown_field(field: str, known) -> ConfigError:
    """'x is not a config field' with the closest known name."""
    prefix, _, name = field.rpartition(".")
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    hint = f" (did you mean {prefix + '.' if prefix else ''}{close[0]}?)" if close else ""
    return ConfigError(f"{field} is not a config field{hint}")


def _check_fields(c, ref: ml_collections.ConfigDict, prefix: str = "") -> None:
    """Every field of `ref` is in c, with a value of the reference's type; no others.

    Overrides on the command line are type-checked by ml_collections, but a config file or
    a ConfigDict built from a dict can hold anything (a string, None, True for an int).
    """
    unknown = sorted(set(c.keys()) - set(ref.keys()))
    if unknown:
        raise unknown_field(prefix + unknown[0], ref.keys())
    for name, default in ref.items():
        field = prefix + name
        if name not in c:
            raise ConfigError(f"{field} is missing; see paper_config() for its default")
        value = c[name]
        if isinstance(default, ml_collections.ConfigDict):
            check(isinstance(value, ml_collections.ConfigDict), field, "must be a block", value)
            _check_fields(value, default, field + ".")
        elif isinstance(default, bool):
            check(isinstance(value, bool), field, "must be True or False", value)
        elif isinstance(default, int):
            # Rounds, seeds and counts become int32 arrays on the device.
            ok = is_int(value) and -(2**31) <= value < 2**31
            check(ok, field, "must be an integer (int32)", value)
        elif isinstance(default, float):
            ok = is_number(value) and math.isfinite(value)
            check(ok, field, "must be a finite number", value)
        elif isinstance(default, str):
            check(isinstance(value, str), field, "must be a string", value)
        elif isinstance(default, tuple):
            check(isinstance(value, (tuple, list)), field, "must be a tuple of values", value)


def validate(c: ml_collections.ConfigDict) -> None:
    """Raises ConfigError naming the first field that cannot run."""
    dataset = c.get("dataset")
    ok = isinstance(dataset, str) and dataset in data.SPECS
    check(ok, "dataset", f"must be one of {sorted(data.SPECS)}", dataset)
    model = c.get("model")
    name = model.get("name") if isinstance(model, ml_collections.ConfigDict) else None
    try:
        models.MODELS.check_name(name)
    except RegistryError as e:
        raise ConfigError(str(e)) from None
    _check_fields(c, reference(c))
    spec = data.SPECS[c.dataset]
    _validate_counts(c)
    _validate_model(c, spec)
    _validate_data(c)
    _validate_devices(c)
    _validate_attack(c, spec.num_classes)
    _validate_selection(c)
    validate_defense_name(c, c.defense.name, "defense.name", spec.num_classes)
    sweeps.validate(c)


def _validate_model(c, spec: data.DatasetSpec) -> None:
    """The model builds from its block and takes the dataset's images to C logits (traced
    abstractly: nothing is computed)."""
    want = models.input_shape(c.model.name)
    check(
        want is None or tuple(spec.image_shape) == want,
        "model.name",
        f"must take {spec.name}'s {'x'.join(map(str, spec.image_shape))} images (it takes "
        f"{'x'.join(map(str, want or ()))}): start from the dataset's own config file in configs/",
        c.model.name,
    )
    hashable = lambda v: tuple(v) if isinstance(v, list) else v
    chosen = models.spec_of(c.model.to_dict())
    block = tuple(sorted((k, hashable(v)) for k, v in chosen.items()))
    factory = models.MODELS.get(c.model.name)
    message = _model_problem(factory, block, tuple(spec.image_shape), spec.num_classes, spec.name)
    if message:
        raise ConfigError(message)


@functools.lru_cache(maxsize=256)
def _model_problem(factory, block, image_shape, num_classes, dataset) -> str:
    """Why the model of `block` cannot run on the dataset's images ('' if it can): traced
    abstractly (nothing is computed), once per model, block and dataset shape."""
    name, shape = dict(block)["name"], (1, *image_shape)
    try:
        model = models.make_model(dict(block), num_classes)
        init = lambda key: model.init(key, jnp.zeros(shape, jnp.float32), train=False)
        variables = jax.eval_shape(init, jax.random.key(0))
        out = jax.eval_shape(lambda v: model.apply(v, jnp.zeros(shape), train=False), variables)
    except RegistryError as e:
        return str(e)
    except ValueError as e:  # a field's value, as the model's layers check it
        return models.MODELS.field_message(name, str(e))
    except Exception as e:  # a user's model may fail in any way while it is traced
        first = str(e).splitlines()[0] if str(e) else ""
        return (
            f"model.name {name!r} cannot take {dataset}'s images {image_shape}: "
            f"{type(e).__name__}: {first}"
        )
    if tuple(out.shape) != (1, num_classes):
        return (
            f"model.name {name!r} must give {num_classes} logits per image, it gives shape "
            f"{tuple(out.shape)}"
        )
    if models.HEAD not in variables.get("params", {}):
        head = models.HEAD
        return f"model.name {name!r} must name its output layer {head!r} (the defenses read it)"
    return ""


def _validate_data(c) -> None:
    d = c.data
    check(d.source in data.SOURCES, "data.source", f"must be one of {data.SOURCES}", d.source)
    try:
        partition.PARTITIONS.check_name(d.partition)
        _try_partition(c)
    except RegistryError as e:
        raise ConfigError(str(e)) from None
    for field in ("synthetic_train", "synthetic_test"):
        check(d[field] > 0, f"data.{field}", "must be a positive integer", d[field])
    check(d.partition_seed >= 0, "data.partition_seed", "must be >= 0", d.partition_seed)


def _try_partition(c) -> None:
    """Builds the partition on stand-in labels, to check its block; what depends on the real
    data (enough examples for the clients) is checked when the data is loaded."""
    num_classes = data.SPECS[c.dataset].num_classes
    labels = np.arange(max(c.num_clients * c.batch_size, num_classes)) % num_classes
    block = c.data[c.data.partition].to_dict() if c.data.partition in c.data else {}
    try:
        partition.split(
            c.data.partition,
            block,
            labels,
            num_clients=c.num_clients,
            batch_size=c.batch_size,
            num_classes=num_classes,
            rng=np.random.default_rng(0),
        )
    except data.DataError:
        pass


def _validate_counts(c) -> None:
    for field in (
        "num_clients",
        "clients_per_round",
        "num_rounds",
        "local_epochs",
        "batch_size",
        "eval_every",
        "eval_batch_size",
        "lr_decay_every",
    ):
        check(c[field] > 0, field, "must be a positive integer", c[field])
    check(
        c.clients_per_round <= c.num_clients,
        "clients_per_round",
        f"must be <= num_clients ({c.num_clients})",
        c.clients_per_round,
    )
    for field in ("local_steps", "clients_at_once"):
        check(c[field] >= 0, field, "must be >= 0 (0: see its help)", c[field])
    check(c.lr > 0, "lr", "must be > 0", c.lr)
    check(0 <= c.momentum < 1, "momentum", "must be in [0, 1)", c.momentum)
    check(0 < c.lr_decay_factor <= 1, "lr_decay_factor", "must be in (0, 1]", c.lr_decay_factor)
    check(c.min_lr >= 0, "min_lr", "must be >= 0", c.min_lr)
    check(
        c.eval_window >= 0, "eval_window", "must be >= 0 (0: the last 10% of rounds)", c.eval_window
    )
    check(
        c.checkpoint_every >= 0 and c.checkpoint_every % c.eval_every == 0,
        "checkpoint_every",
        f"must be 0 (none) or a multiple of eval_every ({c.eval_every}): a checkpoint is "
        "taken after an evaluation",
        c.checkpoint_every,
    )


def _validate_devices(c) -> None:
    check(
        c.mesh.experiments > 0, "mesh.experiments", "must be a positive integer", c.mesh.experiments
    )
    for field in ("clients", "cpu_devices"):
        check(c.mesh[field] >= 0, f"mesh.{field}", "must be >= 0 (0 = automatic)", c.mesh[field])
    validate_distributed(c)


def validate_distributed(c) -> None:
    """The `distributed.` block, checked before the run joins other hosts (see api)."""
    d = c.distributed
    check(d.num_processes >= 1, "distributed.num_processes", "must be >= 1", d.num_processes)
    ok = 0 <= d.process_id < d.num_processes
    check(ok, "distributed.process_id", f"must be in [0, {d.num_processes})", d.process_id)
    ok = 1 <= d.timeout_s <= MAX_TIMEOUT_S
    check(ok, "distributed.timeout_s", f"must be in [1, {MAX_TIMEOUT_S}] seconds", d.timeout_s)
    host, _, port = d.coordinator.rpartition(":")
    ok = d.coordinator in ("", "auto") or (bool(host) and port.isascii() and port.isdigit())
    check(ok, "distributed.coordinator", 'must be "host:port", "auto" or ""', d.coordinator)
    explicit = d.coordinator not in ("", "auto")
    check(
        explicit or d.num_processes == 1,
        "distributed.num_processes",
        'needs distributed.coordinator="host:port"',
        d.num_processes,
    )


def _validate_attack(c, num_classes: int) -> None:
    a = c.attack
    fraction = a.malicious_fraction
    check(0 <= fraction <= 1, "attack.malicious_fraction", "must be in [0, 1]", fraction)
    attackers = round(fraction * c.num_clients)
    check(
        fraction == 0 or attackers > 0,
        "attack.malicious_fraction",
        f"of {c.num_clients} clients is no attacker at all (round({fraction} x "
        f"{c.num_clients}) = 0): use 0, or at least {1 / c.num_clients:.3g}",
        fraction,
    )
    check(
        fraction == 1 or attackers < c.num_clients,
        "attack.malicious_fraction",
        f"of {c.num_clients} clients makes all {c.num_clients} malicious (round({fraction} x "
        f"{c.num_clients}) = {attackers}), not the share it says: use 1.0, or at most "
        f"{(c.num_clients - 1) / c.num_clients:.3g}",
        fraction,
    )
    validate_flips(a.flips, num_classes, "attack.flips")
    validate_attack_name(c, a.name)
    check(
        a.start_round >= 1,
        "attack.start_round",
        "must be >= 1 (rounds count from 1)",
        a.start_round,
    )
    check(
        a.start_round <= c.num_rounds,
        "attack.start_round",
        f"must be <= num_rounds ({c.num_rounds}): nobody would poison",
        a.start_round,
    )
    check(
        a.end_round == -1 or a.end_round >= a.start_round,
        "attack.end_round",
        "must be -1 (the last round) or >= attack.start_round (the last round that poisons)",
        a.end_round,
    )
    check(a.every >= 1, "attack.every", "must be >= 1", a.every)


def _validate_selection(c) -> None:
    s = c.selection
    schedules = selection.SCHEDULES
    check(s.schedule in schedules, "selection.schedule", f"must be one of {schedules}", s.schedule)
    check(s.breakpoint >= 1, "selection.breakpoint", "must be >= 1 (a round number)", s.breakpoint)
    check(0 <= s.alpha <= 1, "selection.alpha", "must be in [0, 1]", s.alpha)
    check(
        s.alpha_after == -1 or 0 <= s.alpha_after <= 1,
        "selection.alpha_after",
        "must be in [0, 1] or -1 (= selection.alpha)",
        s.alpha_after,
    )
