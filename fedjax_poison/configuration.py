"""The configuration of a run: the paper's defaults per dataset, and validation.

Every field is checked before anything is loaded or compiled; a bad value stops with
one line naming the field and what is allowed.
"""

import math
import numbers
import re

import ml_collections
import numpy as np

from fedjax_poison import attacks, data, defenses, models, selection

# The paper's setup (PAPER.md). The lr schedule steps per round here; the original code
# steps it per participation of a client (every 10 of them), i.e. about every
# 10 * N / k = 100 rounds: `lr_decay_every` counts rounds to match that pace.
PAPER_DEFAULTS = {
    "fashion_mnist": dict(
        model="fashion_mnist_cnn",
        batch_size=4,
        lr=1e-3,
        momentum=0.9,
        lr_decay_factor=0.1,
        lr_decay_every=100,
        augment=False,
        flips="6:0",
    ),
    "cifar10": dict(
        model="cifar10_cnn",
        batch_size=10,
        lr=1e-2,
        momentum=0.5,
        lr_decay_factor=0.5,
        lr_decay_every=500,
        augment=True,
        flips="5:3",
    ),
}
SWEEP_AXES = ("malicious_fraction", "flips", "seed", "schedule", "alpha", "breakpoint")
SWEEP_AXES += ("attack", "defense")


class ConfigError(ValueError):
    """A configuration value that cannot run; the message names the field."""


def paper_config(dataset: str) -> ml_collections.ConfigDict:
    """One experiment of the paper on `dataset` (50 clients, 5 per round, 200 rounds)."""
    if dataset not in PAPER_DEFAULTS:
        raise ConfigError(f"dataset must be one of {sorted(PAPER_DEFAULTS)}, got {dataset!r}")
    d = PAPER_DEFAULTS[dataset]
    c = ml_collections.ConfigDict()
    c.dataset = dataset
    c.model = ml_collections.ConfigDict(
        dict(name=d["model"], conv_impl="auto", softmax_output=False)
    )
    c.data = ml_collections.ConfigDict(
        dict(
            source="auto",  # auto | tfds | files | synthetic
            dir="",  # '' = the source's default (TFDS_DATA_DIR, or the Debian package's folder)
            partition="iid",  # iid (the paper's round-robin) | dirichlet
            dirichlet_alpha=0.5,
            partition_seed=0,  # the split is shared by every experiment of a sweep
            synthetic_train=6000,
            synthetic_test=1000,
        )
    )
    c.num_clients = 50
    c.clients_per_round = 5
    c.num_rounds = 200
    c.local_epochs = 1
    c.batch_size = d["batch_size"]
    c.lr = d["lr"]
    c.momentum = d["momentum"]
    c.lr_decay_factor = d["lr_decay_factor"]
    c.lr_decay_every = d["lr_decay_every"]
    c.min_lr = 1e-10
    c.lr_per_participation = False  # True: the original code's per-client schedule
    c.augment = d["augment"]
    c.seed = 0
    c.eval_every = 1
    c.eval_batch_size = 1000
    # Rounds between checkpoints, a multiple of eval_every; 0 = none during training. The same
    # command resumes from the last one; the end of training is always recorded.
    c.save_features = False  # features/*.npz: per (round, client) rows for the PCA analysis
    c.checkpoint_every = 0
    c.overwrite = False  # True: replace a workdir's run of another config instead of refusing
    c.attack = attacks.default_config(d["flips"])
    c.selection = ml_collections.ConfigDict(
        dict(schedule="always", breakpoint=75, alpha=0.5, alpha_after=-1.0)
    )
    c.defense = defenses.default_config()
    c.sweep = ml_collections.ConfigDict({axis: () for axis in SWEEP_AXES})
    c.sweep.mode = "product"  # product | zip
    c.sweep.max_parallel = 0  # experiments run at once; 0 = all
    # Devices for the experiment axis of a sweep and for the clients of a round;
    # clients=0: all devices the experiments axis leaves (on CPU, one per core), at most k.
    # cpu_devices: jax devices on a CPU, 0 = one per core (read by launch.py).
    c.mesh = ml_collections.ConfigDict(dict(clients=0, experiments=1, cpu_devices=0))
    # Several hosts: coordinator "host:port" (or "auto" on TPU pods and SLURM); see BUILD.md.
    c.distributed = ml_collections.ConfigDict(dict(coordinator="", num_processes=1, process_id=0))
    return c


def smoke(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A variant that runs in about a minute on a laptop CPU: synthetic data, few rounds."""
    c.data.source = "synthetic"
    c.data.synthetic_train, c.data.synthetic_test = 2000, 500
    c.num_clients, c.clients_per_round, c.num_rounds = 10, 4, 6
    c.eval_every = 2
    c.attack.malicious_fraction = 0.3
    return c


def _check(ok: bool, field: str, message: str, value) -> None:
    if not ok:
        raise ConfigError(f"{field} {message}, got {_show(value)}")


def _show(value) -> str:
    """A short one-line repr (a ConfigDict's own is multi-line YAML)."""
    if isinstance(value, ml_collections.ConfigDict):
        value = value.to_dict()
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def _check_fields(c, reference: ml_collections.ConfigDict, prefix: str = "") -> None:
    """Every field of `reference` is in c, with a value of the reference's type; no others.

    Overrides on the command line are type-checked by ml_collections, but a config file or
    a ConfigDict built from a dict can hold anything (a string, None, True for an int).
    """
    unknown = sorted(set(c.keys()) - set(reference.keys()))
    if unknown:
        raise ConfigError(f"{prefix}{unknown[0]} is not a config field; see paper_config()")
    for name, default in reference.items():
        field = prefix + name
        if name not in c:
            raise ConfigError(f"{field} is missing; see paper_config() for its default")
        value = c[name]
        if isinstance(default, ml_collections.ConfigDict):
            _check(isinstance(value, ml_collections.ConfigDict), field, "must be a block", value)
            _check_fields(value, default, field + ".")
        elif isinstance(default, bool):
            _check(isinstance(value, bool), field, "must be True or False", value)
        elif isinstance(default, int):
            # Rounds, seeds and counts become int32 arrays on the device.
            ok = _is_int(value) and -(2**31) <= value < 2**31
            _check(ok, field, "must be an integer (int32)", value)
        elif isinstance(default, float):
            ok = _is_number(value) and math.isfinite(value)
            _check(ok, field, "must be a finite number", value)
        elif isinstance(default, str):
            _check(isinstance(value, str), field, "must be a string", value)
        elif isinstance(default, tuple):
            _check(isinstance(value, (tuple, list)), field, "must be a tuple of values", value)


def validate(c: ml_collections.ConfigDict) -> None:
    """Raises ConfigError naming the first field that cannot run."""
    dataset = c.get("dataset")
    ok = isinstance(dataset, str) and dataset in data.SPECS and dataset in PAPER_DEFAULTS
    _check(ok, "dataset", f"must be one of {sorted(data.SPECS)}", dataset)
    _check_fields(c, paper_config(c.dataset))
    spec = data.SPECS[c.dataset]
    _check(
        c.model.name in models.MODELS,
        "model.name",
        f"must be one of {sorted(models.MODELS)}",
        c.model.name,
    )
    _check(
        c.model.conv_impl in ("auto", "im2col", "xla"),
        "model.conv_impl",
        "must be auto, im2col or xla",
        c.model.conv_impl,
    )
    sources = ("auto", "tfds", "files", "synthetic")
    _check(c.data.source in sources, "data.source", f"must be one of {sources}", c.data.source)
    _check(
        c.data.partition in ("iid", "dirichlet"),
        "data.partition",
        "must be iid or dirichlet",
        c.data.partition,
    )
    _check(
        c.data.dirichlet_alpha > 0, "data.dirichlet_alpha", "must be > 0", c.data.dirichlet_alpha
    )
    experiments = c.mesh.experiments
    _check(experiments > 0, "mesh.experiments", "must be a positive integer", experiments)
    for field in ("clients", "cpu_devices"):
        _check(c.mesh[field] >= 0, f"mesh.{field}", "must be >= 0 (0 = automatic)", c.mesh[field])
    _validate_distributed(c.distributed)
    for field in ("synthetic_train", "synthetic_test"):
        value = c.data[field]
        _check(value > 0, f"data.{field}", "must be a positive integer", value)
    seed = c.data.partition_seed
    _check(seed >= 0, "data.partition_seed", "must be >= 0", seed)
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
        _check(
            isinstance(c[field], int) and c[field] > 0,
            field,
            "must be a positive integer",
            c[field],
        )
    _check(
        c.clients_per_round <= c.num_clients,
        "clients_per_round",
        f"must be <= num_clients ({c.num_clients})",
        c.clients_per_round,
    )
    _check(c.lr > 0, "lr", "must be > 0", c.lr)
    _check(0 <= c.momentum < 1, "momentum", "must be in [0, 1)", c.momentum)
    _check(0 < c.lr_decay_factor <= 1, "lr_decay_factor", "must be in (0, 1]", c.lr_decay_factor)
    _check(c.min_lr >= 0, "min_lr", "must be >= 0", c.min_lr)
    _check(
        c.checkpoint_every >= 0 and c.checkpoint_every % c.eval_every == 0,
        "checkpoint_every",
        f"must be 0 (none) or a multiple of eval_every ({c.eval_every}): a checkpoint is "
        "taken after an evaluation",
        c.checkpoint_every,
    )
    _validate_attack(c, spec.num_classes)
    _validate_selection(c)
    _validate_sweep(c, spec.num_classes)
    try:
        defenses.validate(
            c.defense,
            clients_per_round=c.clients_per_round,
            num_clients=c.num_clients,
            num_classes=spec.num_classes,
        )
    except ConfigError:
        raise
    except ValueError as e:  # its messages name the defense field
        raise ConfigError(str(e)) from None


_FLIPS = re.compile(r"\s*(-?[0-9]+\s*:\s*-?[0-9]+\s*(,\s*-?[0-9]+\s*:\s*-?[0-9]+\s*)*)?")


def _validate_distributed(d) -> None:
    _check(d.num_processes >= 1, "distributed.num_processes", "must be >= 1", d.num_processes)
    ok = 0 <= d.process_id < d.num_processes
    _check(ok, "distributed.process_id", f"must be in [0, {d.num_processes})", d.process_id)
    host, _, port = d.coordinator.rpartition(":")
    ok = d.coordinator in ("", "auto") or (bool(host) and port.isascii() and port.isdigit())
    _check(ok, "distributed.coordinator", 'must be "host:port", "auto" or ""', d.coordinator)
    explicit = d.coordinator not in ("", "auto")
    _check(
        explicit or d.num_processes == 1,
        "distributed.num_processes",
        'needs distributed.coordinator="host:port"',
        d.num_processes,
    )


def _validate_flips(text: str, num_classes: int, field: str) -> None:
    # ASCII digits only: str.isdigit() also takes '²', which int() then refuses.
    _check(
        _FLIPS.fullmatch(text) is not None,
        field,
        "must look like '6:0' or '6:0,1:3' (source:target)",
        text,
    )
    flips = attacks.parse_flips(text)
    for source, target in flips:
        _check(
            0 <= source < num_classes and 0 <= target < num_classes,
            field,
            f"classes must be in [0, {num_classes})",
            text,
        )
        _check(source != target, field, "must flip a class to a different class", text)
    sources = [s for s, _ in flips]
    _check(len(set(sources)) == len(sources), field, "names a source class twice", text)


def validate_attack_name(c, name: str, field: str = "attack.name") -> None:
    """Builds the attack `name` with the config's parameters; raises ConfigError naming the
    field that cannot run."""
    spec = data.SPECS[c.dataset]
    try:
        attacks.make_attack(
            name,
            c.attack,
            num_classes=spec.num_classes,
            image_shape=spec.image_shape,
            clients_per_round=c.clients_per_round,
            head_index=np.zeros((1, spec.num_classes), np.int32),
        )
    except attacks.AttackConfigError as e:
        message = str(e) if field == "attack.name" else f"{field}: {e}"
        raise ConfigError(message) from None


def _validate_attack(c, num_classes: int) -> None:
    a = c.attack
    _check(isinstance(a.name, str), "attack.name", "must be a string", a.name)
    validate_attack_name(c, a.name)
    _check(
        0 <= a.malicious_fraction <= 1,
        "attack.malicious_fraction",
        "must be in [0, 1]",
        a.malicious_fraction,
    )
    _validate_flips(a.flips, num_classes, "attack.flips")
    _check(a.start_round >= 0, "attack.start_round", "must be >= 0", a.start_round)
    _check(
        a.end_round == -1 or a.end_round > a.start_round,
        "attack.end_round",
        "must be -1 (to the end) or > attack.start_round",
        a.end_round,
    )
    _check(a.every >= 1, "attack.every", "must be >= 1", a.every)


def _validate_selection(c) -> None:
    s = c.selection
    _check(
        s.schedule in selection.SCHEDULES,
        "selection.schedule",
        f"must be one of {selection.SCHEDULES}",
        s.schedule,
    )
    _check(s.breakpoint >= 0, "selection.breakpoint", "must be >= 0", s.breakpoint)
    _check(0 <= s.alpha <= 1, "selection.alpha", "must be in [0, 1]", s.alpha)
    _check(
        s.alpha_after == -1 or 0 <= s.alpha_after <= 1,
        "selection.alpha_after",
        "must be in [0, 1] or -1 (= selection.alpha)",
        s.alpha_after,
    )


def _validate_sweep(c, num_classes: int) -> None:
    sw = c.sweep
    _check(sw.mode in ("product", "zip"), "sweep.mode", "must be product or zip", sw.mode)
    _check(sw.max_parallel >= 0, "sweep.max_parallel", "must be >= 0", sw.max_parallel)
    lengths = {axis: len(sw[axis]) for axis in SWEEP_AXES if len(sw[axis])}
    if sw.mode == "zip":
        _check(
            len(set(lengths.values())) <= 1, "sweep", "zip axes must have equal lengths", lengths
        )
    for f in sw.malicious_fraction:
        ok = _is_number(f) and 0 <= f <= 1
        _check(ok, "sweep.malicious_fraction", "values must be in [0, 1]", f)
    for flips in sw.flips:
        _check(isinstance(flips, str), "sweep.flips", "values must be strings like '6:0'", flips)
        _validate_flips(flips, num_classes, "sweep.flips")
    for seed in sw.seed:
        ok = _is_int(seed) and -(2**31) <= seed < 2**31
        _check(ok, "sweep.seed", "values must be integers (int32)", seed)
    for name in sw.schedule:
        _check(
            name in selection.SCHEDULES,
            "sweep.schedule",
            f"values must be in {selection.SCHEDULES}",
            name,
        )
    for alpha in sw.alpha:
        pair = alpha if isinstance(alpha, (tuple, list)) else (alpha,)
        _check(
            all(_is_number(a) and 0 <= a <= 1 for a in pair) and len(pair) in (1, 2),
            "sweep.alpha",
            "values must be alpha or (alpha_before, alpha_after) in [0, 1]",
            alpha,
        )
    for b in sw.breakpoint:
        ok = _is_int(b) and 0 <= b < 2**31
        _check(ok, "sweep.breakpoint", "values must be ints >= 0", b)
    for name in sw.attack:
        _check(isinstance(name, str), "sweep.attack", "values must be attack names", name)
        validate_attack_name(c, name, "sweep.attack")
    for name in sw.defense:
        _check(isinstance(name, str), "sweep.defense", "values must be defense names", name)
        other = ml_collections.ConfigDict(c.defense.to_dict())
        other.name = name
        try:
            defenses.validate(
                other,
                clients_per_round=c.clients_per_round,
                num_clients=c.num_clients,
                num_classes=num_classes,
            )
        except ValueError as e:
            raise ConfigError(f"sweep.defense {name!r}: {e}") from None
