"""Attacks: what malicious clients do to their data and to their updates, inside the round.

A registry name -> factory, like the defenses (and optax): every factory returns an
`Attack`, a pair of pure functions over the round's selected clients,

    poison_data(x [k, n, H, W, C] uint8, y [k, n], count [k], ctx) -> (x, y)   before training
    poison_updates(updates [k, d], ctx) -> updates                            before the defense

masked by ctx.poisoned [k] (malicious clients inside the attack window): honest rows come
back untouched. A factory's keyword arguments with defaults are its config block
`attack.<name>.*`; those without (the sizes in SIZES) are filled in by `make_attack`
(the convention of every registry: fedjax_poison/registry.py). Names joined by '+' chain
attacks in order: 'backdoor+scale' stamps a trigger on the data, then boosts the trained
update. Adding an attack is one factory and one `register` call, from the package or from
a user's script (`fedjax_poison.register_attack`).
"""

from __future__ import annotations

import difflib
import functools
from collections.abc import Callable, Sequence

import jax
import ml_collections
from jax import lax

from fedjax_poison.attacks.adaptive import adaptive_flip
from fedjax_poison.attacks.backdoor import backdoor, blended
from fedjax_poison.attacks.base import (
    KNOWLEDGE,
    MEASURES,
    Attack,
    AttackConfigError,
    AttackContext,
    benign_moments,
    clean_data,
    clean_updates,
    none,
    own_state,
    previous_update,
    replace_rows,
    server_aggregate,
    stamp,
)
from fedjax_poison.attacks.collusion import alie, ipm, min_max, min_sum
from fedjax_poison.attacks.contrastive import chameleon
from fedjax_poison.attacks.edge_case import alt_min, edge_case
from fedjax_poison.attacks.fang import fang_krum, fang_trim
from fedjax_poison.attacks.label_flip import (
    Flips,
    flip_table,
    format_flips,
    label_flip,
    mapping_pairs,
    parse_flips,
    poison_labels,
)
from fedjax_poison.attacks.mimic import mimic
from fedjax_poison.attacks.model_poisoning import gaussian, inf, scale, sign_flip
from fedjax_poison.attacks.neurotoxin import neurotoxin
from fedjax_poison.attacks.optimized import alie_opt, ipm_opt
from fedjax_poison.attacks.threat import draw_malicious, poisoning_now
from fedjax_poison.attacks.trigger_search import a3fl, iba
from fedjax_poison.registry import Registry, RegistryError

__all__ = [
    "ATTACKS",
    "KNOWLEDGE",
    "MEASURES",
    "READ_FLIPS",
    "Attack",
    "AttackConfigError",
    "AttackContext",
    "Flips",
    "benign_moments",
    "chain",
    "clean_data",
    "clean_updates",
    "default_config",
    "draw_malicious",
    "evaluation_trigger",
    "flip_table",
    "format_flips",
    "make_attack",
    "mapping_pairs",
    "own_state",
    "parse_flips",
    "poison_labels",
    "poisoning_now",
    "previous_update",
    "register",
    "replace_rows",
    "select",
    "server_aggregate",
    "split_name",
    "stamp",
]

# What make_attack fills in (never config fields).
SIZES = ("num_classes", "image_shape", "clients_per_round", "head_index", "num_params")
# Fields of the attack block shared by every attack.
SHARED = ("name", "malicious_fraction", "flips", "start_round", "end_round", "every")
ATTACKS = Registry("attack", "attack.name", "attack.{name}", sizes=SIZES, reserved=SHARED)


def register(name: str, factory: Callable[..., Attack], *, replace: bool = False):
    """Adds an attack: `factory(**block, **sizes it names) -> Attack` (see the module
    docstring; `fedjax_poison.testing.check_attack` checks the contract)."""
    return ATTACKS.register(name, factory, replace=replace)


register("none", none)
register("label_flip", label_flip)
register("backdoor", backdoor)
register("adaptive_flip", adaptive_flip)
register("sign_flip", sign_flip)
register("gaussian", gaussian)
register("scale", scale)
register("alie", alie)
register("ipm", ipm)
register("min_max", min_max)
register("min_sum", min_sum)
register("inf", inf)
register("fang_krum", fang_krum)
register("fang_trim", fang_trim)
register("mimic", mimic)
register("blended", blended)
register("neurotoxin", neurotoxin)
register("alie_opt", alie_opt)
register("ipm_opt", ipm_opt)
register("edge_case", edge_case)
register("alt_min", alt_min)
register("a3fl", a3fl)
register("iba", iba)
register("chameleon", chameleon)

# Attacks that flip the pairs of `attack.flips` (label_flip too, with mapping 'pairs').
READ_FLIPS = ("adaptive_flip", "edge_case", "alt_min")
# Attacks whose success is read on a triggered test set: a run measures one trigger.
BACKDOORS = (backdoor, blended, neurotoxin, a3fl, iba, chameleon)


def block_defaults(name: str) -> dict:
    """The config block of one attack: its factory's keyword arguments with defaults."""
    return ATTACKS.block(name)


def default_config(flips: str = "") -> ml_collections.ConfigDict:
    """The `attack.` block of an experiment config: the shared fields, then one block per
    attack with parameters (`attack.scale.factor`, `attack.backdoor.target`, ...)."""
    c = ml_collections.ConfigDict()
    c.name = "label_flip"  # one of ATTACKS, or several joined by '+'
    c.malicious_fraction = 0.0
    c.flips = flips  # source:target pairs of label_flip ('pairs') and attacks.READ_FLIPS
    c.start_round = 1  # malicious clients poison in rounds start_round..end_round (from 1)
    c.end_round = -1  # the last round that poisons; -1 = the last round of the run
    c.every = 1  # poison every n-th round of the window
    for name in ATTACKS:
        defaults = block_defaults(name)
        if defaults:
            c[name] = ml_collections.ConfigDict(defaults)
    return c


def split_name(name: str) -> list[str]:
    """'backdoor+scale' -> ['backdoor', 'scale']; an unknown part stops with the closest names."""
    parts = [p.strip() for p in str(name).split("+")]
    for part in parts:
        if part not in ATTACKS:
            close = difflib.get_close_matches(part, list(ATTACKS), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise AttackConfigError(
                f"attack.name {name!r}: {part!r} is not an attack{hint}; "
                f"choose from {sorted(ATTACKS)}, joined by '+' to chain them"
            )
    if len(parts) > 1 and "none" in parts:
        raise AttackConfigError(f"attack.name {name!r}: 'none' cannot be chained")
    if sum(ATTACKS[p] in BACKDOORS for p in parts) > 1:
        raise AttackConfigError(f"attack.name {name!r}: at most one backdoor in a chain")
    return parts


def make_attack(name: str, cfg, **sizes) -> Attack:
    """The attack `name` ('a' or 'a+b+...') with its parameters from the `attack.` block.

    sizes: num_classes, image_shape, clients_per_round, head_index ([F, C] positions of the
    output kernel in the flattened parameters), num_params (d, their count). Raises
    AttackConfigError naming the field.
    """
    built = []
    for part in split_name(name):
        block = cfg[part] if part in cfg else {}
        try:
            built.append(ATTACKS.build(part, dict(block.items()), **sizes))
        except RegistryError as e:
            raise AttackConfigError(str(e)) from None
    return chain(*built)


def chain(*parts: Attack) -> Attack:
    """The attacks applied in order: each one's data seam, then each one's update seam.

    Part i draws its randomness from the round's key folded with i, so that two random
    parts do not share draws. Its measure is the first targeted one (backdoor or flip) of
    the parts, else untargeted. With a part that has a state, the chain's state is the
    tuple of the parts' states (() for a part without one).
    """
    if len(parts) == 1:
        return parts[0]
    stateful = any(p.init is not None for p in parts)

    def own(ctx, i):
        ctx = ctx._replace(key=jax.random.fold_in(ctx.key, i))
        if stateful and ctx.state is not None:
            ctx = ctx._replace(state=ctx.state[i])
        return ctx

    def poison_data(x, y, count, ctx):
        for i, part in enumerate(parts):
            x, y = part.poison_data(x, y, count, own(ctx, i))
        return x, y

    def poison_updates(updates, ctx):
        for i, part in enumerate(parts):
            updates = part.poison_updates(updates, own(ctx, i))
        return updates

    targeted = [p for p in parts if p.measure in ("flip", "backdoor")]
    first = targeted[0] if targeted else parts[0]
    measure = first.measure if targeted else "untargeted"
    if not stateful:
        return Attack(poison_data, poison_updates, measure, first.trigger, first.target)

    def init():
        return tuple(p.init() if p.init is not None else () for p in parts)

    def learn(x, y, count, ctx):
        ctx = ctx._replace(state=init() if ctx.state is None else ctx.state)
        return tuple(
            p.learn(x, y, count, own(ctx, i)) if p.learn is not None else ctx.state[i]
            for i, p in enumerate(parts)
        )

    j = parts.index(first)
    trigger = None if first.trigger is None else lambda x, state: stamp(first, x, state[j])
    return Attack(poison_data, poison_updates, measure, trigger, first.target, init, learn)


def select(attack_set: Sequence[Attack], index: jax.Array) -> Attack:
    """One attack of the run's set, chosen by a traced index (an experiment's scenario),
    so that a sweep over attacks stays one compiled program. Measure and trigger are the
    host's business (they differ per experiment) and are left unset. With an attack that
    has a state, the set's state is the tuple of every attack's (() for those without);
    a round updates the chosen one's only."""
    if len(attack_set) == 1:
        return attack_set[0]
    stateful = any(a.init is not None for a in attack_set)

    def own(ctx, i):
        return ctx._replace(state=ctx.state[i]) if stateful and ctx.state is not None else ctx

    def data_branch(i):
        return lambda x, y, count, ctx: attack_set[i].poison_data(x, y, count, own(ctx, i))

    def updates_branch(i):
        return lambda updates, ctx: attack_set[i].poison_updates(updates, own(ctx, i))

    def poison_data(x, y, count, ctx):
        branches = [data_branch(i) for i in range(len(attack_set))]
        return lax.switch(index, branches, x, y, count, ctx)

    def poison_updates(updates, ctx):
        branches = [updates_branch(i) for i in range(len(attack_set))]
        return lax.switch(index, branches, updates, ctx)

    if not stateful:
        return Attack(poison_data, poison_updates, "none")

    def init():
        return tuple(a.init() if a.init is not None else () for a in attack_set)

    def learn(x, y, count, ctx):
        states = init() if ctx.state is None else ctx.state

        def learn_one(i, x, y, count, ctx):
            if attack_set[i].learn is None:
                return states
            new = attack_set[i].learn(x, y, count, ctx._replace(state=states[i]))
            return (*states[:i], new, *states[i + 1 :])

        branches = [functools.partial(learn_one, i) for i in range(len(attack_set))]
        return lax.switch(index, branches, x, y, count, ctx)

    return Attack(poison_data, poison_updates, "none", init=init, learn=learn)


def evaluation_trigger(attack_set: Sequence[Attack]) -> Callable | None:
    """(images [..., H, W, C] uint8, the set's state as select() keeps it, index) -> the
    images with the trigger of attack_set[index] (its current state's, for a trigger that
    learns); for an attack without one (the clean twin, a flip), the set's first trigger.
    None when no attack of the set has a trigger."""
    found = [i for i, a in enumerate(attack_set) if a.trigger is not None]
    if not found:
        return None

    def measured_by(i):
        j = i if attack_set[i].trigger is not None else found[0]
        attack = attack_set[j]
        if attack.init is None:
            return lambda x, state: attack.trigger(x)
        if len(attack_set) == 1:
            return attack.trigger
        return lambda x, state: attack.trigger(x, state[j])

    if len(found) == 1:  # every experiment reads the one trigger
        return lambda x, state, index: measured_by(found[0])(x, state)
    branches = [measured_by(i) for i in range(len(attack_set))]
    return lambda x, state, index: lax.switch(index, branches, x, state)
