"""Random configs against validation: every bad one stops with a ConfigError naming a field.

Each test mutates a valid paper config (wrong types, out-of-range numbers, unknown names,
missing or unknown fields, bad flips, bad sweep axes, schedules the client pools cannot
honour) and calls `configuration.validate` and `experiments.expand`, as a run does before
it loads anything. A bad config must raise ConfigError (a ValueError) whose message names
the field; nothing else may escape (no TypeError, no error from inside JAX). Valid configs
must pass. Each test prints how many configs it tried (pytest -s).
"""

import functools
import math
import re

import ml_collections
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedjax_poison import defenses
from fedjax_poison.config import configuration, experiments
from fedjax_poison.round import selection

BAD_EXAMPLES = 400
REFUSED = [0]  # configs refused with a ConfigError naming the field
FUZZ = settings(
    max_examples=BAD_EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


def flatten(d: dict, prefix: str = "") -> dict:
    """{'a': {'b': 1}} -> {'a': {...}, 'a.b': 1}: every field, blocks included."""
    out = {}
    for key, value in d.items():
        out[prefix + key] = value
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
    return out


BASE = {name: configuration.paper_config(name).to_dict() for name in ("fashion_mnist", "cifar10")}
FIELDS = flatten(BASE["fashion_mnist"])
LEAVES = sorted(k for k, v in FIELDS.items() if not isinstance(v, dict))
NAMES = {  # fields holding one of a few names
    "dataset",
    "model.name",
    "model.fashion_mnist_cnn.conv_impl",
    "data.source",
    "data.partition",
    "selection.schedule",
    "defense.name",
    "defense.mode",
    "sweep.mode",
}
FRACTIONS = ("attack.malicious_fraction", "selection.alpha")
POSITIVE = (
    "num_clients",
    "clients_per_round",
    "num_rounds",
    "local_epochs",
    "batch_size",
    "eval_every",
    "eval_batch_size",
    "lr_decay_every",
    "data.synthetic_train",
    "data.synthetic_test",
    "attack.every",
    "defense.pca.window",
    "defense.pca.kmeans_iters",
    "defense.pca.block_after",
    "defense.geometric_median.iters",
    "defense.centered_clipping.iters",
    "defense.fltrust.root_size",
)
NON_NEGATIVE = (
    "checkpoint_every",
    "local_steps",
    "clients_at_once",
    "data.partition_seed",
    "attack.start_round",
    "selection.breakpoint",
    "sweep.max_parallel",
    "defense.pca.start_round",
    "defense.krum.num_byzantine",
)


def build(paper: str = "fashion_mnist", **changes) -> ml_collections.ConfigDict:
    """The paper config with dotted fields changed, built from a dict (as a config file or a
    loaded config.json can be), so that no type check of ml_collections stands in the way.
    A field of a member's block (defense.pca.window, data.dirichlet.alpha) also makes that
    member the one in use: a block is checked by building its member."""
    d = _copy(BASE[paper])
    for path, value in changes.items():
        section, *member = path.split(".")[:-1] or [""]
        if section == "defense" and member:
            pre = member[0] in defenses.PRE_AGGREGATORS and member[0] not in defenses.DEFENSES
            d["defense"]["name"] = f"{member[0]}+median" if pre else member[0]
        if section == "data" and member:
            d["data"]["partition"] = member[0]
        *parents, last = path.split(".")
        target = d
        for p in parents:
            target = target[p]
        target[last] = value
    return ml_collections.ConfigDict(d)


def _copy(d):
    return {k: _copy(v) if isinstance(v, dict) else v for k, v in d.items()}


def check(c: ml_collections.ConfigDict):
    """validate + expand, as a run does before loading anything."""
    configuration.validate(c)
    return experiments.expand(c)


def assert_refused(c, *fields: str) -> str:
    """c must raise ConfigError whose message names one of `fields`."""
    with pytest.raises(configuration.ConfigError) as info:
        check(c)
    message = str(info.value)
    REFUSED[0] += 1
    named = [f for f in fields if re.search(rf"(?<![\w.]){re.escape(f)}(?![\w])", message)]
    assert named, f"{message!r} names none of {fields}"
    assert "\n" not in message
    return message


def run_counted(test) -> int:
    """Runs a hypothesis test function and returns how many examples it tried."""
    count = [0]

    @functools.wraps(test)
    def counted(*args, **kwargs):
        count[0] += 1
        return test(*args, **kwargs)

    FUZZ(given(**test.strategies)(counted))()
    return count[0]


def fuzz(**strategies):
    def wrap(test):
        test.strategies = strategies
        return test

    return wrap


def wrong_value(default) -> st.SearchStrategy:
    """Values of another type than `default`'s (ints out of int32 count as wrong)."""
    anything = st.one_of(
        st.none(),
        st.lists(st.integers(), max_size=2),
        st.dictionaries(st.text("abc", max_size=3), st.integers(), max_size=2),
    )
    if isinstance(default, dict):
        return st.one_of(anything, st.integers(), st.text(max_size=5))
    if isinstance(default, bool):
        return st.one_of(anything, st.integers(), st.floats(), st.text(max_size=5))
    if isinstance(default, int):
        return st.one_of(
            anything,
            st.booleans(),
            st.text(max_size=5),
            st.floats(allow_nan=True),  # 5.0 is a float too: not an int field's value
            st.integers(min_value=2**31),
            st.integers(max_value=-(2**31) - 1),
        )
    if isinstance(default, float):
        return st.one_of(
            anything,
            st.booleans(),
            st.text(max_size=5),
            st.sampled_from([math.nan, math.inf, -math.inf]),
        )
    if isinstance(default, str):
        return st.one_of(anything, st.booleans(), st.integers(), st.floats())
    if isinstance(default, (tuple, list)):
        return st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text())
    raise AssertionError(f"no wrong values for {default!r}")


@st.composite
def wrongly_typed(draw):
    field = draw(st.sampled_from(sorted(FIELDS)))
    return field, draw(wrong_value(FIELDS[field]))


@fuzz(case=wrongly_typed())
def wrong_types_are_refused(case):
    field, value = case
    assert_refused(build(**{field: value}), field)


@st.composite
def out_of_range(draw):
    kind = draw(st.sampled_from(["positive", "non_negative", "fraction", "name", "number"]))
    if kind == "positive":
        return draw(st.sampled_from(POSITIVE)), draw(st.integers(-(2**31), 0))
    if kind == "non_negative":
        return draw(st.sampled_from(NON_NEGATIVE)), draw(st.integers(-(2**31), -1))
    if kind == "fraction":
        outside = st.one_of(st.floats(max_value=-1e-9), st.floats(min_value=1 + 1e-9))
        return draw(st.sampled_from(FRACTIONS)), draw(outside.filter(math.isfinite))
    if kind == "name":
        field = draw(st.sampled_from(sorted(NAMES)))
        return field, draw(st.text(max_size=12).filter(lambda t: t != FIELDS[field]))
    field, bad = draw(
        st.sampled_from(
            [
                ("lr", st.floats(max_value=0)),
                ("min_lr", st.floats(max_value=-1e-30)),
                ("momentum", st.one_of(st.floats(max_value=-1e-9), st.floats(min_value=1))),
                ("lr_decay_factor", st.one_of(st.floats(max_value=0), st.floats(min_value=1.01))),
                ("data.dirichlet.alpha", st.floats(max_value=0)),
                (
                    "defense.trimmed_mean.trim_ratio",
                    st.one_of(st.floats(max_value=-0.01), st.floats(0.5)),
                ),
                ("defense.pca.min_separation", st.floats(max_value=-1e-9)),
                ("selection.alpha_after", st.floats(1.01).filter(lambda a: a != -1)),
                ("defense.pca.source_class", st.integers(10, 2**31 - 1)),
            ]
        )
    )
    return field, draw(bad.filter(math.isfinite))


@fuzz(case=out_of_range())
def out_of_range_values_are_refused(case):
    field, value = case
    if field in NAMES and value in _allowed(field):
        return  # drew an allowed name after all
    assert_refused(build(**{field: value}), field)


def _allowed(field: str):
    from fedjax_poison import data, models
    from fedjax_poison.data import partition

    return {
        "dataset": data.SPECS,
        "model.name": models.MODELS,
        "model.fashion_mnist_cnn.conv_impl": ("auto", "im2col", "xla"),
        "data.source": data.SOURCES,
        "data.partition": partition.PARTITIONS,
        "selection.schedule": selection.SCHEDULES,
        "defense.name": defenses.DEFENSES,
        "defense.mode": defenses.MODES,
        "sweep.mode": ("product", "zip"),
    }[field]


@fuzz(
    field=st.sampled_from(LEAVES),
    name=st.from_regex(r"[a-z_]{1,12}", fullmatch=True),
    add=st.booleans(),
)
def missing_and_unknown_fields_are_refused(field, name, add):
    d = _copy(BASE["fashion_mnist"])
    *parents, last = field.split(".")
    block = d
    for p in parents:
        block = block[p]
    if add:
        if name in block:
            return
        block[name] = 1
        assert_refused(ml_collections.ConfigDict(d), ".".join([*parents, name]))
    else:
        del block[last]
        assert_refused(ml_collections.ConfigDict(d), field)


FLIP_TEXT = st.text(alphabet="0123456789:,- x²٣", max_size=10)


def flips_oracle(text: str) -> bool:
    """An independent reading of a valid flips string: 's:t' pairs, classes in [0, 10)."""
    if not text.strip():
        return True
    pairs = []
    for item in text.split(","):
        m = re.fullmatch(r"\s*(-?[0-9]+)\s*:\s*(-?[0-9]+)\s*", item)
        if not m or not all(0 <= int(v) < 10 for v in m.groups()):
            return False
        pairs.append((int(m[1]), int(m[2])))
    sources = [s for s, _ in pairs]
    return all(s != t for s, t in pairs) and len(set(sources)) == len(sources)


@fuzz(text=FLIP_TEXT, where=st.sampled_from(["attack.flips", "sweep.flips"]))
def flips_strings_are_read_or_refused(text, where):
    c = build(**{where: text if where == "attack.flips" else (text,)})
    if flips_oracle(text):
        check(c)
    else:
        assert_refused(c, where)


@st.composite
def bad_sweeps(draw):
    axis = draw(st.sampled_from(configuration.SWEEP_AXES))
    bad = {
        "malicious_fraction": st.one_of(
            st.floats(min_value=1.01), st.floats(max_value=-0.01), st.text(max_size=3)
        ),
        "flips": st.one_of(st.integers(), st.just("6:6"), st.just("6:10"), st.none()),
        "seed": st.one_of(st.floats(), st.text(max_size=3), st.booleans(), st.integers(2**31)),
        "schedule": st.text(max_size=8).filter(lambda s: s not in selection.SCHEDULES),
        "alpha": st.one_of(
            st.floats(min_value=1.01),
            st.text(max_size=3),
            st.lists(st.floats(0, 1), min_size=3, max_size=4),
            st.just(()),
        ),
        "breakpoint": st.one_of(st.integers(max_value=0), st.floats(), st.booleans()),
        "attack": st.one_of(st.integers(), st.just("lable_flip"), st.just("none+scale")),
        "defense": st.one_of(st.integers(), st.just("krum+median"), st.just("medain")),
    }[axis]
    good = st.lists(st.sampled_from(_good_values(axis)), max_size=2)
    values = draw(good) + [draw(bad)] + draw(good)
    return axis, values


def _good_values(axis: str):
    return {
        "malicious_fraction": (0.0, 0.2),
        "flips": ("6:0", "1:3"),
        "seed": (0, 7),
        "schedule": ("always",),
        "alpha": (0.0,),
        "breakpoint": (1, 75),
        "attack": ("label_flip", "sign_flip"),
        "defense": ("fedavg", "median"),
    }[axis]


@fuzz(case=bad_sweeps(), mode=st.sampled_from(["product", "zip"]))
def bad_sweep_values_are_refused(case, mode):
    axis, values = case
    assert_refused(build(**{f"sweep.{axis}": tuple(values), "sweep.mode": mode}), f"sweep.{axis}")


@fuzz(
    axes=st.lists(st.sampled_from(configuration.SWEEP_AXES), min_size=2, max_size=3, unique=True),
    lengths=st.lists(st.integers(1, 3), min_size=3, max_size=3),
)
def zip_sweeps_of_unequal_lengths_are_refused(axes, lengths):
    lengths = lengths[: len(axes)]
    if len(set(lengths)) == 1:
        lengths[0] += 1
    changes = {f"sweep.{a}": _good_values(a)[:1] * n for a, n in zip(axes, lengths)}
    assert_refused(build(**changes, **{"sweep.mode": "zip"}), "sweep")


@fuzz(
    n=st.integers(1, 60),
    k_share=st.floats(0, 1),
    fraction=st.floats(0, 1),
    schedule=st.sampled_from(selection.SCHEDULES),
    alpha=st.floats(0, 1),
    swept=st.booleans(),
)
def schedules_are_checked_against_the_client_pools(n, k_share, fraction, schedule, alpha, swept):
    k = max(1, round(k_share * n))
    bad = int(round(fraction * n))
    good = n - bad
    all_of_them = bad == n and fraction < 1  # rounds to every client: not the share named
    if bad == 0:  # no attacker: every schedule runs as 'always' (nobody to schedule)
        feasible = fraction == 0
    elif all_of_them:
        feasible = False
    elif schedule in ("early", "late"):
        feasible = good >= k
    elif schedule == "availability":
        feasible = alpha * k <= bad and (1 - alpha) * k <= good
    else:
        feasible = True
    changes = {"num_clients": n, "clients_per_round": k, "selection.alpha": alpha}
    if swept:  # the same through the sweep axes
        changes.update(
            {"sweep.malicious_fraction": (fraction,), "sweep.schedule": (schedule,)},
        )
    else:
        changes.update({"attack.malicious_fraction": fraction, "selection.schedule": schedule})
    c = build(**changes)
    if feasible:
        assert len(check(c)) == 1
    elif bad == 0 or all_of_them:  # a fraction of the clients that is nobody, or everybody
        assert_refused(c, "attack.malicious_fraction", "sweep.malicious_fraction")
    else:
        assert_refused(c, "selection.schedule", "selection.alpha")


@fuzz(
    dataset=st.sampled_from(sorted(BASE)),
    n=st.integers(1, 100),
    k_share=st.floats(0, 1),
    rounds=st.integers(1, 500),
    eval_every=st.integers(1, 50),
    checkpoints=st.integers(0, 5),
    fraction=st.floats(0, 1),
    flips=st.sampled_from(["6:0", "1:3,4:6", "", "5:3"]),
    seeds=st.lists(st.integers(-(2**31), 2**31 - 1), max_size=3, unique=True),
    defense=st.sampled_from(["fedavg", "median", "trimmed_mean", "pca", "krum", "foolsgold"]),
    overwrite=st.booleans(),
)
def valid_configs_pass(
    dataset, n, k_share, rounds, eval_every, checkpoints, fraction, flips, seeds, defense, overwrite
):
    k = max(1, round(k_share * n))
    if round(fraction * n) == 0 or not flips:  # no attacker, or a flip that flips nothing
        fraction = 0.0
    if round(fraction * n) == n:  # every client: say so
        fraction = 1.0
    if defense == "pca":
        k = max(k, 2) if n >= 2 else 1
        defense = defense if k >= 2 else "fedavg"
    if defense == "krum" and k <= 4:  # krum needs k > 2f + 2 with f = 1
        defense = "median"
    c = build(
        dataset,
        num_clients=n,
        clients_per_round=k,
        num_rounds=rounds,
        eval_every=eval_every,
        checkpoint_every=checkpoints * eval_every,
        overwrite=overwrite,
        **{
            "attack.malicious_fraction": fraction,
            "attack.flips": flips,
            "sweep.seed": tuple(seeds),
            "defense.name": defense,
        },
    )
    assert len(check(c)) == max(1, len(seeds))


BAD = [
    wrong_types_are_refused,
    out_of_range_values_are_refused,
    missing_and_unknown_fields_are_refused,
    bad_sweep_values_are_refused,
    zip_sweeps_of_unequal_lengths_are_refused,
]
MIXED = [flips_strings_are_read_or_refused, schedules_are_checked_against_the_client_pools]


@pytest.mark.parametrize("test", BAD + MIXED + [valid_configs_pass], ids=lambda t: t.__name__)
@pytest.mark.slow  # the quick tier leaves launches and large compiles out
def test_fuzz(test):
    refused = REFUSED[0]
    tried = run_counted(test)
    refused = REFUSED[0] - refused
    print(f"{test.__name__}: {tried} configs tried, {refused} refused naming the field")
    if test in BAD:
        assert refused >= tried * 0.9  # the rest drew an allowed name or a taken field name
    if test is valid_configs_pass:
        assert refused == 0
    assert tried >= BAD_EXAMPLES // 2


def test_the_paper_configs_pass():
    for c in BASE.values():
        check(ml_collections.ConfigDict(c))


def test_checkpoint_every_must_follow_the_evaluations():
    message = assert_refused(build(eval_every=5, checkpoint_every=12), "checkpoint_every")
    assert "multiple of eval_every (5)" in message
