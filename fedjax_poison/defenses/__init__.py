"""Defenses: aggregation rules over one round's stacked client updates, inside the jitted round.

A registry name -> factory, like optax: every factory returns a `Defense`, a pair of pure
functions `init() -> memory` and `apply(view, memory) -> (verdict, memory)`. The round
builds a `RoundView` (updates `delta = local - global` [k, d], the output layer's rows,
client ids, round index, which rows are valid) and adds `verdict.delta` to the global params.

Pre-aggregators (`norm_clipping`, `bucketing`, `nnm`) compose with any rule, optax-chain
style, written with '+' in `defense.name`: 'nnm+krum', 'norm_clipping+bucketing+median'
(see preaggregate.py). docs/defenses.md tabulates every rule, its paper and conventions.

`defense.mode`: 'detect' = flags and scores reported, aggregate = plain FedAvg; 'filter' =
the rule's own aggregate (flagged clients dropped); 'block' (pca only) = 'filter', and
clients flagged `block_after` times are excluded from later rounds. Rules that do not flag
clients (fedavg, median, trimmed_mean, krum, geometric_median, norm_clipping,
centered_clipping) always aggregate by their rule, in 'detect' as in 'filter'.

Every rule honours `RoundView.valid` (an invalid row changes nothing, not even the rule's
memory) and returns finite aggregates and scores that are never NaN on finite rows of any
size; the server (server.guard) turns non-finite rows into invalid ones.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import jax
import ml_collections
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
from fedjax_poison.defenses.config import default_config, validate
from fedjax_poison.defenses.preaggregate import PreAggregator, chain
from fedjax_poison.defenses.registry import DEFENSES, PRE_AGGREGATORS, split_name
from fedjax_poison.defenses.source_pca import PCAMemory

__all__ = [
    "DEFENSES",
    "MODES",
    "PRE_AGGREGATORS",
    "Defense",
    "PCAMemory",
    "PreAggregator",
    "RoundView",
    "Verdict",
    "auc",
    "default_config",
    "detection_counts",
    "make_defense",
    "select",
    "split_name",
    "validate",
    "weighted_mean",
]


def make_defense(
    cfg,
    *,
    num_clients: int,
    clients_per_round: int,
    num_params: int,
    num_classes: int,
    head_features: int,
) -> Defense:
    """Validate the `defense.` block (a ConfigDict or a plain mapping) and build the named
    rule, or chain ('nnm+krum').

    Each factory's keyword arguments are named after config fields or these sizes.
    """
    cfg = ml_collections.ConfigDict(dict(cfg))
    validate(
        cfg, clients_per_round=clients_per_round, num_clients=num_clients, num_classes=num_classes
    )
    values = dict(cfg.items())
    values.update(
        num_clients=num_clients,
        clients_per_round=clients_per_round,
        num_params=num_params,
        num_classes=num_classes,
        head_features=head_features,
    )

    def build(factory):
        return factory(**{p: values[p] for p in inspect.signature(factory).parameters})

    pre, rule = split_name(cfg.name)
    if not pre:
        return build(DEFENSES[rule])
    return chain([build(PRE_AGGREGATORS[p]) for p in pre], build(DEFENSES[rule]), cfg.mode)


def select(defense_set: Sequence[Defense], index: jax.Array) -> Defense:
    """One rule of the run's set, chosen by a traced index (an experiment's scenario), so
    that a sweep over defenses stays one compiled program.

    Its memory is the tuple of every rule's memory (each experiment holds them all; only
    the chosen rule's changes). `needs_root` and `flags_clients` hold for any of the set.
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
        needs_root=any(d.needs_root for d in defense_set),
        flags_clients=any(d.flags_clients for d in defense_set),
    )
