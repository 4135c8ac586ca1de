"""The configuration of a run: the paper's defaults per dataset, and validation.

Every field is checked before anything is loaded or compiled; a bad value stops with
one line naming the field and what is allowed.
"""

import ml_collections

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
    c.checkpoint_every = 0  # rounds; 0 = never
    c.attack = ml_collections.ConfigDict(
        dict(
            malicious_fraction=0.0,
            flips=d["flips"],
            start_round=0,  # malicious clients poison in rounds [start_round, end_round)
            end_round=-1,  # -1 = until the last round
            every=1,  # poison every n-th round of the window
        )
    )
    c.selection = ml_collections.ConfigDict(
        dict(schedule="always", breakpoint=75, alpha=0.5, alpha_after=-1.0)
    )
    c.defense = defenses.default_config()
    c.sweep = ml_collections.ConfigDict({axis: () for axis in SWEEP_AXES})
    c.sweep.mode = "product"  # product | zip
    c.sweep.max_parallel = 0  # experiments run at once; 0 = all
    c.mesh = ml_collections.ConfigDict(dict(clients=1, experiments=1))
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
        raise ConfigError(f"{field} {message}, got {value!r}")


def validate(c: ml_collections.ConfigDict) -> None:
    """Raises ConfigError naming the first field that cannot run."""
    _check(c.dataset in data.SPECS, "dataset", f"must be one of {sorted(data.SPECS)}", c.dataset)
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
    _check(c.checkpoint_every >= 0, "checkpoint_every", "must be >= 0", c.checkpoint_every)
    _validate_attack(c, spec.num_classes)
    _validate_selection(c)
    _validate_sweep(c, spec.num_classes)
    defenses.validate(
        c.defense,
        clients_per_round=c.clients_per_round,
        num_clients=c.num_clients,
        num_classes=spec.num_classes,
    )


def _validate_flips(text: str, num_classes: int, field: str) -> None:
    try:
        flips = attacks.parse_flips(text)
    except ValueError as e:
        raise ConfigError(str(e).replace("attack.flips", field)) from None
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


def _validate_attack(c, num_classes: int) -> None:
    a = c.attack
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
        _check(0 <= f <= 1, "sweep.malicious_fraction", "values must be in [0, 1]", f)
    for flips in sw.flips:
        _validate_flips(flips, num_classes, "sweep.flips")
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
            all(0 <= a <= 1 for a in pair) and len(pair) in (1, 2),
            "sweep.alpha",
            "values must be alpha or (alpha_before, alpha_after) in [0, 1]",
            alpha,
        )
    for b in sw.breakpoint:
        _check(isinstance(b, int) and b >= 0, "sweep.breakpoint", "values must be ints >= 0", b)
