"""Defenses: aggregation rules over one round's stacked client updates, inside the jitted round.

A registry name -> factory, like optax: every factory returns a `Defense`, a pair of pure
functions `init() -> memory` and `apply(view, memory) -> (verdict, memory)`. A factory's
keyword arguments with defaults are its block `defense.<name>.*`, validated by building it
(fedjax_poison/registry.py); `register` adds a rule or pre-aggregator from a user's script.
The round builds a `RoundView` (updates `delta = local - global` [k, d], the output layer's rows,
client ids, round index, which rows are valid) and adds `verdict.delta` to the global params.

Pre-aggregators (`norm_clipping`, `bucketing`, `nnm`, `arc`) compose with any rule, optax-chain
style, written with '+' in `defense.name`: 'nnm+krum', 'norm_clipping+bucketing+median'
(see preaggregate.py). docs/defenses.md tabulates every rule, its paper and conventions.

`defense.mode`: 'detect' = flags and scores reported, aggregate = plain FedAvg; 'filter' =
the rule's own aggregate (flagged clients dropped); 'block' (pca only) = 'filter', and
clients flagged `block_after` times are excluded from later rounds. Rules that do not flag
clients (fedavg, median, trimmed_mean, krum, geometric_median, norm_clipping,
centered_clipping, caf, meamed, weak_dp, robust_lr, crfl) always aggregate by their rule,
in 'detect' as in 'filter'. `certified_radius` gives CRFL's certificate (defenses/crfl.py).

Every rule honours `RoundView.valid` (an invalid row changes nothing, not even the rule's
memory) and returns finite aggregates and scores that are never NaN on finite rows of any
size; the server (server.guard) turns non-finite rows into invalid ones.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
from jax import lax

from fedjax_poison.defenses.base import (
    MODES,
    Defense,
    RoundView,
    Verdict,
    auc,
    detection_counts,
    weighted_mean,
)
from fedjax_poison.defenses.config import block_for, default_config
from fedjax_poison.defenses.crfl import CertificationError, attack_lipschitz, certified_radius
from fedjax_poison.defenses.preaggregate import PreAggregator, chain
from fedjax_poison.defenses.registry import (
    DEFENSES,
    PRE_AGGREGATORS,
    SHARED,
    SIZES,
    register,
    split_name,
)
from fedjax_poison.defenses.source_pca import PCAMemory
from fedjax_poison.registry import RegistryError, short

__all__ = [
    "DEFENSES",
    "MODES",
    "PRE_AGGREGATORS",
    "SHARED",
    "SIZES",
    "CertificationError",
    "Defense",
    "PCAMemory",
    "PreAggregator",
    "RoundView",
    "Verdict",
    "attack_lipschitz",
    "auc",
    "block_for",
    "certified_radius",
    "default_config",
    "detection_counts",
    "make_defense",
    "register",
    "select",
    "split_name",
    "validate",
    "weighted_mean",
]


def make_defense(
    cfg: Mapping,
    *,
    num_clients: int,
    clients_per_round: int,
    num_params: int,
    num_classes: int,
    head_features: int,
    layer_sizes: Sequence[int] = (),
) -> Defense:
    """The rule or chain ('nnm+krum') named by the `defense.` block (a ConfigDict or a
    mapping: name, mode, and the blocks of its parts by name), built from each part's block.

    Each part gets as `clients_per_round` the rows it receives (bucketing passes fewer on).
    `layer_sizes`: the size of each parameter array of the flattened update, in order
    (models.layer_sizes); () for one array of `num_params`.
    Raises RegistryError naming the field that cannot run.
    """
    cfg = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    name, mode = cfg.get("name"), cfg.get("mode", "filter")
    pre, rule = split_name(name)
    if mode not in MODES:
        raise RegistryError(f"defense.mode must be one of {list(MODES)}, got {mode!r}")
    if mode == "block" and name != "pca":
        raise RegistryError(f"defense.mode='block' needs defense.name='pca', got {name!r}")
    if not 1 <= clients_per_round <= num_clients:
        raise RegistryError(
            f"defense.name {name!r} needs 1 <= k <= N, got k={clients_per_round}, N={num_clients}"
        )
    layers = tuple(int(n) for n in layer_sizes) or (num_params,)
    if sum(layers) != num_params or min(layers) < 1:
        raise RegistryError(
            f"layer sizes {short(layers)} must be positive and sum to num_params={num_params}"
        )
    sizes = dict(
        num_clients=num_clients,
        num_params=num_params,
        num_classes=num_classes,
        head_features=head_features,
        mode=mode,
        layer_sizes=layers,
    )
    rows, parts, clients = clients_per_round, [], True
    for part in pre:
        built = PRE_AGGREGATORS.build(part, cfg.get(part), clients_per_round=rows, **sizes)
        parts.append(built)
        rows, clients = built.rows, clients and built.rows_are_clients
    if DEFENSES.member(rule).info["per_client_memory"] and not clients:
        raise RegistryError(
            f"defense.name {name!r}: {rule} keeps a memory per client and cannot follow "
            "bucketing, whose rows are buckets, not clients"
        )
    try:
        built = DEFENSES.build(rule, cfg.get(rule), clients_per_round=rows, **sizes)
    except RegistryError as e:
        raise RegistryError(f"{e} (k: the rows after {'+'.join(pre)})" if pre else str(e)) from None
    return chain(parts, built, mode) if parts else built


def validate(cfg: Mapping, *, clients_per_round: int, num_clients: int, num_classes: int) -> None:
    """Raises RegistryError naming the field if the `defense.` block cannot run: the rule is
    built as the run would build it (its sizes that only shape arrays set to 1)."""
    make_defense(
        cfg,
        num_clients=num_clients,
        clients_per_round=clients_per_round,
        num_params=1,
        num_classes=num_classes,
        head_features=1,
    )


def select(defense_set: Sequence[Defense], index: jax.Array) -> Defense:
    """One rule of the run's set, chosen by a traced index (an experiment's scenario), so
    that a sweep over defenses stays one compiled program.

    Its memory is the tuple of every rule's memory (each experiment holds them all; only
    the chosen rule's changes). `root_size` and `flags_clients` hold for any of the set.
    """

    def init():
        return tuple(d.init() for d in defense_set)

    def branch(i: int):
        def apply(view, memory):
            verdict, mine = defense_set[i].apply(view, memory[i])
            return verdict, memory[:i] + (mine,) + memory[i + 1 :]

        return apply

    def apply(view, memory):
        if len(defense_set) == 1:
            return branch(0)(view, memory)
        return lax.switch(index, [branch(i) for i in range(len(defense_set))], view, memory)

    return Defense(
        init,
        apply,
        root_size=max(d.root_size for d in defense_set),
        flags_clients=any(d.flags_clients for d in defense_set),
    )
