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
    previous_update,
    replace_rows,
    server_aggregate,
)
from fedjax_poison.attacks.collusion import alie, ipm, min_max, min_sum
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
    "flip_table",
    "format_flips",
    "make_attack",
    "mapping_pairs",
    "parse_flips",
    "poison_labels",
    "poisoning_now",
    "previous_update",
    "register",
    "replace_rows",
    "select",
    "server_aggregate",
    "split_name",
]

# What make_attack fills in (never config fields).
SIZES = ("num_classes", "image_shape", "clients_per_round", "head_index")
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

# Attacks that flip the pairs of `attack.flips` (label_flip too, with mapping 'pairs').
READ_FLIPS = ("adaptive_flip", "edge_case", "alt_min")
# Attacks whose success is read on a triggered test set: a run measures one trigger.
BACKDOORS = (backdoor, blended, neurotoxin)


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
    output kernel in the flattened parameters). Raises AttackConfigError naming the field.
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
    the parts, else untargeted.
    """
    if len(parts) == 1:
        return parts[0]
    own_key = lambda ctx, i: ctx._replace(key=jax.random.fold_in(ctx.key, i))

    def poison_data(x, y, count, ctx):
        for i, part in enumerate(parts):
            x, y = part.poison_data(x, y, count, own_key(ctx, i))
        return x, y

    def poison_updates(updates, ctx):
        for i, part in enumerate(parts):
            updates = part.poison_updates(updates, own_key(ctx, i))
        return updates

    targeted = [p for p in parts if p.measure in ("flip", "backdoor")]
    first = targeted[0] if targeted else parts[0]
    measure = first.measure if targeted else "untargeted"
    return Attack(poison_data, poison_updates, measure, first.trigger, first.target)


def select(attack_set: Sequence[Attack], index: jax.Array) -> Attack:
    """One attack of the run's set, chosen by a traced index (an experiment's scenario),
    so that a sweep over attacks stays one compiled program. Measure and trigger are the
    host's business (they differ per experiment) and are left unset."""
    if len(attack_set) == 1:
        return attack_set[0]

    def poison_data(x, y, count, ctx):
        branches = [a.poison_data for a in attack_set]
        return lax.switch(index, branches, x, y, count, ctx)

    def poison_updates(updates, ctx):
        return lax.switch(index, [a.poison_updates for a in attack_set], updates, ctx)

    return Attack(poison_data, poison_updates, "none")
