"""The flat `defense.` config block: its defaults and its validation."""

from __future__ import annotations

import math

import ml_collections

from fedjax_poison.defenses.base import MODES
from fedjax_poison.defenses.registry import PER_CLIENT_MEMORY, split_name
from fedjax_poison.defenses.source_pca import ROW_SCALES


def default_config() -> ml_collections.ConfigDict:
    """The `defense.` block of an experiment config."""
    c = ml_collections.ConfigDict()
    # One of DEFENSES, after any pre-aggregators joined by '+': 'nnm+krum', 'bucketing+median'.
    c.name = "fedavg"
    c.mode = "filter"  # detect | filter | block (block: pca only); see the package docstring
    # pca (Tolpegin et al. 2020): the source class's output row, over a window of rounds.
    c.source_class = -1  # the attacked class if the server knows it; -1: the best separated
    c.window = 10  # rounds of rows clustered together (W*k rows)
    # pca flags from this round on (numbered from 1); the paper's offline analysis used its
    # code's rounds 10..199 counted from 0, i.e. start_round 11.
    c.start_round = 1
    # Gap between the two clusters' mean signs (cosine with the learned part of the global
    # row: its change since round 1 began), in pooled within-cluster standard deviations,
    # needed to flag anyone; the lower cluster's mean sign must also be negative. Measured
    # on Fashion-MNIST: at most 2.5 with no attacker (100 rounds, 20 rows or more), 3.1 to
    # 10 with 30-50% (docs/pca_detection.md).
    c.min_separation = 3.0
    # Rows of different rounds differ in scale (lr schedule): 'update' divides each row by
    # its client's whole-update norm, which the flip barely moves; 'row': unit rows; 'none'.
    c.row_scale = "update"
    c.block_after = 3  # mode 'block': exclude a client once it was flagged this many times
    c.kmeans_iters = 20  # Lloyd iterations (pca, lfighter, signguard)
    # trimmed_mean (Yin et al. 2018): drop `trim` values at each end of every coordinate.
    c.trim_ratio = 0.2  # trim = floor(trim_ratio * n) of the n valid updates when trim is -1
    c.trim = -1  # explicit count per end; -1: use trim_ratio
    # krum, multi_krum, bulyan (Blanchard et al. 2017; El Mhamdi et al. 2018); nnm, dnc.
    c.num_byzantine = 1  # f: krum needs k > 2f + 2, bulyan k >= 4f + 3
    c.multi_krum_m = -1  # updates multi-krum averages; -1: n - f of the n valid updates
    # geometric_median (RFA, Pillutla et al. 2022): smoothed Weiszfeld.
    c.gm_iters = 10  # the RFA paper finds a few iterations enough
    c.gm_eps = 1e-6  # smoothing nu: distances below it count as nu
    # norm_clipping (Sun et al. 2019) and centered_clipping (Karimireddy et al. 2021).
    c.clip_norm = 0.0  # bound on each update's norm; 0: this round's median norm
    c.cc_tau = 0.0  # clipping radius around the center; 0: this round's median distance
    c.cc_iters = 1  # the paper finds one iteration enough
    # fltrust (Cao et al. 2021): the round trains on a clean root set of this many examples.
    c.root_size = 100
    # bucketing (Karimireddy, He and Jaggi 2022): updates averaged per bucket.
    c.bucket_size = 2
    # flame (Nguyen et al. 2022): noise std per coordinate = flame_lambda * median norm.
    c.flame_lambda = 0.001  # the paper's value for image classification
    # dnc (Shejwalkar and Houmansadr 2021): iterations, coordinates per subsample, and c:
    # each iteration removes floor(c * f) updates.
    c.dnc_iters = 5
    c.dnc_subsample = 10000
    c.dnc_c = 1.0
    # signguard (Xu et al. 2022): norm bounds over the median norm, coordinates sampled.
    c.signguard_lower = 0.1
    c.signguard_upper = 3.0
    c.signguard_fraction = 0.1
    return c


def resolved(cfg, clients_per_round: int) -> dict:
    """Config fields with the counts derived from k filled in (trim, multi_krum_m); the
    rules derive them again from the valid count of each round."""
    values = dict(cfg.items())
    if values["trim"] < 0:
        values["trim"] = int(values["trim_ratio"] * clients_per_round + 1e-9)  # floor
    if values["multi_krum_m"] < 0:
        values["multi_krum_m"] = clients_per_round - values["num_byzantine"]
    return values


def _check(ok: bool, field: str, need: str, got) -> None:
    if not ok:
        raise ValueError(f"defense.{field} must be {need}, got {got!r}")


FINITE = ("trim_ratio", "min_separation", "gm_eps", "clip_norm", "cc_tau", "flame_lambda")
FINITE += ("dnc_c", "signguard_lower", "signguard_upper", "signguard_fraction")
AT_LEAST_ONE = ("window", "kmeans_iters", "block_after", "gm_iters", "cc_iters", "root_size")
AT_LEAST_ONE += ("bucket_size", "dnc_iters", "dnc_subsample")


def check_ranges(cfg) -> None:
    """Field ranges that do not depend on the round's size."""
    for field in FINITE:
        _check(math.isfinite(cfg[field]), field, "a finite number", cfg[field])
    for field in AT_LEAST_ONE:
        _check(cfg[field] >= 1, field, ">= 1", cfg[field])
    _check(0 <= cfg.trim_ratio < 0.5, "trim_ratio", "in [0, 0.5)", cfg.trim_ratio)
    _check(cfg.trim >= -1, "trim", ">= 0 (or -1 for trim_ratio)", cfg.trim)
    _check(cfg.num_byzantine >= 0, "num_byzantine", ">= 0", cfg.num_byzantine)
    ok = cfg.multi_krum_m == -1 or cfg.multi_krum_m >= 1
    _check(ok, "multi_krum_m", ">= 1 or -1", cfg.multi_krum_m)
    _check(cfg.start_round >= 1, "start_round", ">= 1 (a round number)", cfg.start_round)
    _check(cfg.min_separation >= 0, "min_separation", ">= 0", cfg.min_separation)
    _check(cfg.row_scale in ROW_SCALES, "row_scale", f"one of {list(ROW_SCALES)}", cfg.row_scale)
    _check(cfg.gm_eps > 0, "gm_eps", "> 0", cfg.gm_eps)
    _check(cfg.clip_norm >= 0, "clip_norm", ">= 0 (0: median norm)", cfg.clip_norm)
    _check(cfg.cc_tau >= 0, "cc_tau", ">= 0 (0: median distance)", cfg.cc_tau)
    _check(cfg.flame_lambda >= 0, "flame_lambda", ">= 0", cfg.flame_lambda)
    _check(cfg.dnc_c >= 0, "dnc_c", ">= 0", cfg.dnc_c)
    lower, upper = cfg.signguard_lower, cfg.signguard_upper
    _check(0 <= lower <= 1, "signguard_lower", "in [0, 1] (the median norm passes)", lower)
    _check(upper >= 1, "signguard_upper", ">= 1 (the median norm passes)", upper)
    fraction = cfg.signguard_fraction
    _check(0 < fraction <= 1, "signguard_fraction", "in (0, 1]", fraction)


def _check_rule(rule: str, cfg, m: int, where: str) -> None:
    """What the aggregator `rule` needs of the m rows it receives."""
    f, v = cfg.num_byzantine, resolved(cfg, m)
    if rule == "trimmed_mean":
        _check(2 * v["trim"] < m, "trim", f"< k/2 with k={m}{where}", v["trim"])
    if rule in ("krum", "multi_krum"):
        _check(m > 2 * f + 2, "num_byzantine", f"< (k-2)/2: {rule} needs k > 2f+2, k={m}{where}", f)
    if rule == "multi_krum":
        _check(v["multi_krum_m"] <= m, "multi_krum_m", f"<= k={m}{where}", v["multi_krum_m"])
    if rule == "bulyan":
        need = f"<= (k-3)/4: bulyan needs k >= 4f+3, k={m}{where}"
        _check(m >= 4 * f + 3, "num_byzantine", need, f)
    if rule == "dnc":
        removed = int(cfg.dnc_c * f + 1e-9)
        need = f"< k/f: dnc removes floor(c*f)={removed} of k={m}{where}"
        _check(removed < m, "dnc_c", need, cfg.dnc_c)
    if rule in ("lfighter", "pca"):
        _check(m >= 2, "name", f"used with k >= 2 clients per round, k={m}{where}", cfg.name)


def check_clients(cfg, k: int) -> None:
    """What the chosen chain needs of k, the clients per round: each part of the rows it
    receives (bucketing leaves ceil(k / bucket_size) rows)."""
    pre, rule = split_name(cfg.name)
    m = k
    for part in pre:
        if part == "nnm":
            need = f"< k/2: nnm averages the k-f nearest of k={m} rows"
            _check(m > 2 * cfg.num_byzantine, "num_byzantine", need, cfg.num_byzantine)
        if part == "bucketing":
            m = -(-m // cfg.bucket_size)
    if rule in PER_CLIENT_MEMORY and "bucketing" in pre:
        raise ValueError(
            f"defense.name {cfg.name!r}: {rule} keeps a memory per client and cannot follow "
            "bucketing, whose rows are buckets, not clients"
        )
    _check_rule(rule, cfg, m, f" rows after {'+'.join(pre)}" if pre else "")


def validate(cfg, *, clients_per_round: int, num_clients: int, num_classes: int) -> None:
    """Raise ValueError naming the field if the `defense.` block cannot run."""
    unknown = sorted(set(cfg.keys()) - set(default_config().keys()))
    if unknown:
        raise ValueError(f"defense.{unknown[0]} is not a defense field; see default_config()")
    split_name(cfg.name)
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
    check_ranges(cfg)
    check_clients(cfg, clients_per_round)
