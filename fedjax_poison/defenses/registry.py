"""The rules and pre-aggregators by name, and how a chain of them is spelled.

Both are registries (fedjax_poison/registry.py): a factory's keyword arguments with
defaults are the block `defense.<name>.*`; SIZES are filled in by the run. A rule and a
pre-aggregator may share a name (norm_clipping) when their blocks agree: one block serves
both. `fedjax_poison.register_defense` adds either from a user's script.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable

from fedjax_poison.defenses.backdoor import robust_lr, weak_dp
from fedjax_poison.defenses.base import Defense
from fedjax_poison.defenses.centered import meamed, monna
from fedjax_poison.defenses.clustering import auror, simple_clustering
from fedjax_poison.defenses.covariance import caf
from fedjax_poison.defenses.crfl import crfl
from fedjax_poison.defenses.deepsight import deepsight
from fedjax_poison.defenses.dnc import dnc
from fedjax_poison.defenses.flame import flame
from fedjax_poison.defenses.flare import flare
from fedjax_poison.defenses.fldetector import fldetector
from fedjax_poison.defenses.krum import bulyan, krum, multi_krum
from fedjax_poison.defenses.lasa import lasa
from fedjax_poison.defenses.preaggregate import PreAggregator, arc, bucketing, clipping, nnm
from fedjax_poison.defenses.rflbat import rflbat
from fedjax_poison.defenses.robust import (
    centered_clipping,
    fedavg,
    geometric_median,
    median,
    norm_clipping,
    trimmed_mean,
)
from fedjax_poison.defenses.signguard import signguard
from fedjax_poison.defenses.similarity import fltrust, foolsgold, lfighter
from fedjax_poison.defenses.source_pca import pca
from fedjax_poison.defenses.subsets import mda, smea
from fedjax_poison.registry import Registry, RegistryError, signature_block

# What the run fills in: clients_per_round is the number of rows the part receives (after
# any pre-aggregator before it), mode the shared `defense.mode`, layer_sizes the size of
# each parameter array in the flattened update (models.layer_sizes; they sum to num_params).
SIZES = (
    "num_clients",
    "clients_per_round",
    "num_params",
    "num_classes",
    "head_features",
    "mode",
    "layer_sizes",
)
# Fields of the defense block shared by every rule.
SHARED = ("name", "mode")
# Aggregators: the last part of a name (or the whole of it).
DEFENSES = Registry("defense", "defense.name", "defense.{name}", sizes=SIZES, reserved=SHARED)
# Pre-aggregators: any number of them, joined by '+', before an aggregator.
PRE_AGGREGATORS = Registry(
    "pre-aggregator", "defense.name", "defense.{name}", sizes=SIZES, reserved=SHARED
)


def register(
    name: str,
    factory: Callable[..., Defense | PreAggregator],
    *,
    pre_aggregator: bool = False,
    per_client_memory: bool = False,
    replace: bool = False,
):
    """Adds a rule (`factory(**block, **sizes it names) -> Defense`) or, with
    pre_aggregator=True, a pre-aggregator (-> PreAggregator). per_client_memory: its memory
    is indexed by client, so its rows must stay clients (no bucketing before it)."""
    registry, other = (PRE_AGGREGATORS, DEFENSES) if pre_aggregator else (DEFENSES, PRE_AGGREGATORS)
    if name in other and signature_block(factory, SIZES) != other.block(name):
        raise RegistryError(
            f"defense {name!r}: a rule and a pre-aggregator of one name share the block "
            f"defense.{name}, so their arguments with defaults must be the same"
        )
    return registry.register(name, factory, replace=replace, per_client_memory=per_client_memory)


register("fedavg", fedavg)
register("pca", pca, per_client_memory=True)
register("median", median)
register("trimmed_mean", trimmed_mean)
register("krum", krum)
register("multi_krum", multi_krum)
register("bulyan", bulyan)
register("geometric_median", geometric_median)
register("norm_clipping", norm_clipping)
register("centered_clipping", centered_clipping)
register("foolsgold", foolsgold, per_client_memory=True)
register("fltrust", fltrust)
register("lfighter", lfighter)
register("flame", flame)
register("dnc", dnc)
register("signguard", signguard)
register("mda", mda)
register("monna", monna)
register("meamed", meamed)
register("caf", caf)
register("smea", smea)
register("weak_dp", weak_dp)
register("robust_lr", robust_lr)
register("simple_clustering", simple_clustering)
register("auror", auror)
register("fldetector", fldetector, per_client_memory=True)
register("flare", flare)
register("deepsight", deepsight)
register("rflbat", rflbat)
register("lasa", lasa)
register("crfl", crfl)
register("norm_clipping", clipping, pre_aggregator=True)
register("bucketing", bucketing, pre_aggregator=True)
register("nnm", nnm, pre_aggregator=True)
register("arc", arc, pre_aggregator=True)


def blocks() -> dict[str, dict]:
    """Every block `defense.<name>`: {name: defaults}, for rules and pre-aggregators with
    arguments, in registration order."""
    out = {}
    for registry in (DEFENSES, PRE_AGGREGATORS):
        for name in registry:
            if registry.block(name):
                out[name] = registry.block(name)
    return out


def _unknown(name: str, part: str, choices) -> ValueError:
    close = difflib.get_close_matches(part, choices, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return RegistryError(
        f"defense.name must be one of {sorted(DEFENSES)}, after any pre-aggregators of "
        f"{sorted(PRE_AGGREGATORS)} joined by '+' (e.g. 'nnm+krum'), got {name!r}: "
        f"{part!r} is not one{hint}"
    )


def split_name(name: str) -> tuple[list[str], str]:
    """'norm_clipping+bucketing+median' -> (['norm_clipping', 'bucketing'], 'median').

    Raises RegistryError naming `defense.name` and the closest valid name for an unknown
    part, or for a pre-aggregator used last or an aggregator used before the last place."""
    parts = str(name).split("+")
    *pre, last = parts
    for part in pre:
        if part not in PRE_AGGREGATORS:
            if part in DEFENSES:
                raise RegistryError(
                    f"defense.name {name!r}: {part!r} is an aggregator and can only come last;"
                    f" pre-aggregators are {sorted(PRE_AGGREGATORS)}"
                )
            raise _unknown(name, part, list(PRE_AGGREGATORS))
    if last not in DEFENSES:
        if last in PRE_AGGREGATORS:
            raise RegistryError(
                f"defense.name {name!r}: {last!r} is a pre-aggregator and needs an aggregator"
                f" after it, e.g. '{name}+fedavg'"
            )
        raise _unknown(name, last, list(DEFENSES) + list(PRE_AGGREGATORS))
    return pre, last
