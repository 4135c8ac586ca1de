"""Defenses: aggregation rules over one round's stacked client updates, inside the jitted round.

A registry name -> factory, like optax: every factory returns a `Defense`, a pair of pure
functions `init() -> memory` and `apply(view, memory) -> (verdict, memory)`. The round
builds a `RoundView` (updates `delta = local - global` [k, d], the output layer's rows,
client ids, round index) and adds `verdict.delta` to the global params.

`defense.mode`: 'detect' = flags and scores reported, aggregate = plain FedAvg; 'filter' =
the rule's own aggregate (flagged clients dropped); 'block' (pca only) = 'filter', and
clients flagged `block_after` times are excluded from later rounds. Rules that do not flag
clients (fedavg, median, trimmed_mean, krum, geometric_median, norm_clipping,
centered_clipping) always aggregate by their rule, in 'detect' as in 'filter'.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping, Sequence

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
from fedjax_poison.defenses.robust import (
    bulyan,
    centered_clipping,
    fedavg,
    geometric_median,
    krum,
    median,
    multi_krum,
    norm_clipping,
    trimmed_mean,
)
from fedjax_poison.defenses.similarity import fltrust, foolsgold, lfighter
from fedjax_poison.defenses.source_pca import ROW_SCALES, PCAMemory, pca

__all__ = [
    "DEFENSES",
    "Defense",
    "PCAMemory",
    "RoundView",
    "Verdict",
    "auc",
    "default_config",
    "detection_counts",
    "make_defense",
    "select",
    "validate",
    "weighted_mean",
]

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
}


def default_config() -> ml_collections.ConfigDict:
    """The `defense.` block of an experiment config."""
    c = ml_collections.ConfigDict()
    c.name = "fedavg"  # one of DEFENSES
    c.mode = "filter"  # detect | filter | block (block: pca only); see the module docstring
    # pca (Tolpegin et al. 2020): the source class's output row, over a window of rounds.
    c.source_class = -1  # the attacked class if the server knows it; -1: the best separated
    c.window = 10  # rounds of rows clustered together (W*k rows)
    c.start_round = 10  # no flags before this round (the paper's code uses rounds 10..199)
    # Gap between the two clusters' mean signs (cosine with the global row), in pooled
    # within-cluster standard deviations, needed to flag anyone (measured on Fashion-MNIST
    # windows: at most 0.8 (1.6 with source_class -1) with no attacker, median 5 with 10-50%).
    c.min_separation = 3.0
    # Rows of different rounds differ in scale (lr schedule): 'update' divides each row by
    # its client's whole-update norm, which the flip barely moves; 'row': unit rows; 'none'.
    c.row_scale = "update"
    c.block_after = 3  # mode 'block': exclude a client once it was flagged this many times
    c.kmeans_iters = 20  # Lloyd iterations (pca and lfighter)
    # trimmed_mean (Yin et al. 2018): drop `trim` values at each end of every coordinate.
    c.trim_ratio = 0.2  # trim = floor(trim_ratio * k) when trim is -1
    c.trim = -1  # explicit count per end; -1: use trim_ratio
    # krum, multi_krum, bulyan (Blanchard et al. 2017; El Mhamdi et al. 2018).
    c.num_byzantine = 1  # f: krum needs k > 2f + 2, bulyan k >= 4f + 3
    c.multi_krum_m = -1  # updates multi-krum averages; -1: k - f
    # geometric_median (RFA, Pillutla et al. 2022): smoothed Weiszfeld.
    c.gm_iters = 10  # the RFA paper finds a few iterations enough
    c.gm_eps = 1e-6  # smoothing nu: distances below it count as nu
    # norm_clipping (Sun et al. 2019) and centered_clipping (Karimireddy et al. 2021).
    c.clip_norm = 0.0  # bound on each update's norm; 0: this round's median norm
    c.cc_tau = 0.0  # clipping radius around the center; 0: this round's median distance
    c.cc_iters = 1  # the paper finds one iteration enough
    # fltrust (Cao et al. 2021): the round trains on a clean root set of this many examples.
    c.root_size = 100
    return c


def _resolved(cfg, clients_per_round: int) -> dict:
    """Config fields with the derived counts filled in (trim, multi_krum_m)."""
    values = dict(cfg.items())
    if values["trim"] < 0:
        values["trim"] = int(values["trim_ratio"] * clients_per_round + 1e-9)  # floor
    if values["multi_krum_m"] < 0:
        values["multi_krum_m"] = clients_per_round - values["num_byzantine"]
    return values


def _check(ok: bool, field: str, need: str, got) -> None:
    if not ok:
        raise ValueError(f"defense.{field} must be {need}, got {got!r}")


def _check_ranges(cfg) -> None:
    """Field ranges that do not depend on the round's size."""
    for field in ("trim_ratio", "min_separation", "gm_eps", "clip_norm", "cc_tau"):
        _check(math.isfinite(cfg[field]), field, "a finite number", cfg[field])
    _check(0 <= cfg.trim_ratio < 0.5, "trim_ratio", "in [0, 0.5)", cfg.trim_ratio)
    _check(cfg.trim >= -1, "trim", ">= 0 (or -1 for trim_ratio)", cfg.trim)
    _check(cfg.num_byzantine >= 0, "num_byzantine", ">= 0", cfg.num_byzantine)
    _check(
        cfg.multi_krum_m == -1 or cfg.multi_krum_m >= 1,
        "multi_krum_m",
        ">= 1 or -1",
        cfg.multi_krum_m,
    )
    for field in ("window", "kmeans_iters", "block_after", "gm_iters", "cc_iters", "root_size"):
        _check(cfg[field] >= 1, field, ">= 1", cfg[field])
    _check(cfg.start_round >= 0, "start_round", ">= 0", cfg.start_round)
    _check(cfg.min_separation >= 0, "min_separation", ">= 0", cfg.min_separation)
    _check(cfg.row_scale in ROW_SCALES, "row_scale", f"one of {list(ROW_SCALES)}", cfg.row_scale)
    _check(cfg.gm_eps > 0, "gm_eps", "> 0", cfg.gm_eps)
    _check(cfg.clip_norm >= 0, "clip_norm", ">= 0 (0: median norm)", cfg.clip_norm)
    _check(cfg.cc_tau >= 0, "cc_tau", ">= 0 (0: median distance)", cfg.cc_tau)


def _check_clients(cfg, k: int) -> None:
    """What the chosen rule needs of k, the clients per round."""
    name, f, v = cfg.name, cfg.num_byzantine, _resolved(cfg, k)
    if name == "trimmed_mean":
        _check(2 * v["trim"] < k, "trim", f"< k/2 with k={k} clients per round", v["trim"])
    if name in ("krum", "multi_krum"):
        _check(k > 2 * f + 2, "num_byzantine", f"< (k-2)/2: {name} needs k > 2f+2, k={k}", f)
    if name == "multi_krum":
        _check(v["multi_krum_m"] <= k, "multi_krum_m", f"<= k={k}", v["multi_krum_m"])
    if name == "bulyan":
        _check(k >= 4 * f + 3, "num_byzantine", f"<= (k-3)/4: bulyan needs k >= 4f+3, k={k}", f)
    if name in ("lfighter", "pca"):
        _check(k >= 2, "name", f"used with k >= 2 clients per round, k={k}", name)


def validate(cfg, *, clients_per_round: int, num_clients: int, num_classes: int) -> None:
    """Raise ValueError naming the field if the `defense.` block cannot run."""
    unknown = sorted(set(cfg.keys()) - set(default_config().keys()))
    if unknown:
        raise ValueError(f"defense.{unknown[0]} is not a defense field; see default_config()")
    _check(cfg.name in DEFENSES, "name", f"one of {sorted(DEFENSES)}", cfg.name)
    _check(cfg.mode in MODES, "mode", f"one of {list(MODES)}", cfg.mode)
    if cfg.mode == "block" and cfg.name != "pca":
        raise ValueError(f"defense.mode='block' needs defense.name='pca', got {cfg.name!r}")
    _check(
        -1 <= cfg.source_class < num_classes,
        "source_class",
        f"in [0, {num_classes}) or -1 (unknown)",
        cfg.source_class,
    )
    _check(
        1 <= clients_per_round <= num_clients,
        "name",
        f"used with 1 <= k={clients_per_round} <= N={num_clients}",
        cfg.name,
    )
    _check_ranges(cfg)
    _check_clients(cfg, clients_per_round)


def make_defense(
    cfg,
    *,
    num_clients: int,
    clients_per_round: int,
    num_params: int,
    num_classes: int,
    head_features: int,
) -> Defense:
    """Validate the `defense.` block and build the named rule.

    Each factory's keyword arguments are named after config fields or these sizes.
    """
    validate(
        cfg, clients_per_round=clients_per_round, num_clients=num_clients, num_classes=num_classes
    )
    values = _resolved(cfg, clients_per_round)
    values.update(
        num_clients=num_clients,
        clients_per_round=clients_per_round,
        num_params=num_params,
        num_classes=num_classes,
        head_features=head_features,
    )
    factory = DEFENSES[cfg.name]
    params = inspect.signature(factory).parameters
    return factory(**{p: values[p] for p in params})


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
