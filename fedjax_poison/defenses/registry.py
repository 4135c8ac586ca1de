"""The names of every rule and pre-aggregator, and how a chain of them is spelled."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping

from fedjax_poison.defenses.base import Defense
from fedjax_poison.defenses.dnc import dnc
from fedjax_poison.defenses.flame import flame
from fedjax_poison.defenses.krum import bulyan, krum, multi_krum
from fedjax_poison.defenses.preaggregate import PreAggregator, bucketing, clipping, nnm
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

# Aggregators: the last part of a name (or the whole of it).
DEFENSES: Mapping[str, Callable[..., Defense]] = {
    "fedavg": fedavg,
    "pca": pca,
    "median": median,
    "trimmed_mean": trimmed_mean,
    "krum": krum,
    "multi_krum": multi_krum,
    "bulyan": bulyan,
    "geometric_median": geometric_median,
    "norm_clipping": norm_clipping,
    "centered_clipping": centered_clipping,
    "foolsgold": foolsgold,
    "fltrust": fltrust,
    "lfighter": lfighter,
    "flame": flame,
    "dnc": dnc,
    "signguard": signguard,
}
# Pre-aggregators: any number of them, joined by '+', before an aggregator.
PRE_AGGREGATORS: Mapping[str, Callable[..., PreAggregator]] = {
    "norm_clipping": clipping,
    "bucketing": bucketing,
    "nnm": nnm,
}
# Rules whose memory is per client: their rows must stay clients (no bucketing before them).
PER_CLIENT_MEMORY = ("foolsgold", "pca")


def _unknown(name: str, part: str, choices) -> ValueError:
    close = difflib.get_close_matches(part, choices, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ValueError(
        f"defense.name must be one of {sorted(DEFENSES)}, after any pre-aggregators of "
        f"{sorted(PRE_AGGREGATORS)} joined by '+' (e.g. 'nnm+krum'), got {name!r}: "
        f"{part!r} is not one{hint}"
    )


def split_name(name: str) -> tuple[list[str], str]:
    """'norm_clipping+bucketing+median' -> (['norm_clipping', 'bucketing'], 'median').

    Raises ValueError naming `defense.name` and the closest valid name for an unknown part,
    or for a pre-aggregator used last or an aggregator used before the last place."""
    parts = str(name).split("+")
    *pre, last = parts
    for part in pre:
        if part not in PRE_AGGREGATORS:
            if part in DEFENSES:
                raise ValueError(
                    f"defense.name {name!r}: {part!r} is an aggregator and can only come last;"
                    f" pre-aggregators are {sorted(PRE_AGGREGATORS)}"
                )
            raise _unknown(name, part, list(PRE_AGGREGATORS))
    if last not in DEFENSES:
        if last in PRE_AGGREGATORS:
            raise ValueError(
                f"defense.name {name!r}: {last!r} is a pre-aggregator and needs an aggregator"
                f" after it, e.g. '{name}+fedavg'"
            )
        raise _unknown(name, last, list(DEFENSES) + list(PRE_AGGREGATORS))
    return pre, last
