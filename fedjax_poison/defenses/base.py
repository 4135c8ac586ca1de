"""What every defense sees and returns, the shared aggregation helpers, detection metrics.

Sign convention: an update is `delta = local - global`, what the server adds.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from fedjax_poison.defenses.numeric import row_norms as row_norms  # re-exported
from fedjax_poison.defenses.numeric import sq_distances as sq_distances  # re-exported
from fedjax_poison.defenses.numeric import unit_rows

PyTree = Any
MODES = ("detect", "filter", "block")


class RoundView(NamedTuple):
    """What the server sees of one round. Never the malicious mask or the flip table.

    Every field is derived from the updates the clients sent (after any attack on them).
    A row whose norm is not finite (NaN, inf, or so large that its norm overflows) is
    invalid: the server zeroes it here, flags it and gives it no weight whatever the rule.
    Every rule honours `valid`: an invalid row has no influence on the aggregate, the
    weights or the rule's memory, and the verdict on the other rows is the rule's verdict
    on a round of those rows alone. Counts tied to k (trim, Krum's neighbours, ...) are
    taken from the valid count.
    """

    updates: jax.Array  # [k, d] float32, flattened client deltas (local - global); 0 if invalid
    head_rows: jax.Array  # [k, C, F] change of the output kernel, transposed: row c -> logit c
    global_head: jax.Array  # [C, F] global output kernel (transposed) before the round
    client_ids: jax.Array  # [k] int32, which of the N clients these are
    round: jax.Array  # [] int32, 0-based round index (traced)
    root_update: jax.Array  # [d] the server's update on its clean root set; zeros if unused
    valid: jax.Array  # [k] bool, the client's update is finite (rows with False are zeros)
    global_params: jax.Array  # [d] the flattened global params before the round


class Verdict(NamedTuple):
    """A defense's decision for one round.

    An invalid row (`RoundView.valid` False) gets weight 0, no flag (the server flags it)
    and score 0. Weights sum to 1 over the valid rows, or are all 0 when the rule keeps
    nobody (then delta is 0: the round changes nothing).
    """

    delta: jax.Array  # [d] aggregate update the server adds to the global params
    weights: jax.Array  # [k] >= 0: each client's share (also for BatchNorm statistics)
    flags: jax.Array  # [k] bool, True = judged malicious
    scores: jax.Array  # [k] float32, higher = more suspicious (+inf allowed, never NaN)
    block: jax.Array  # [k] bool, exclude this client from all later rounds


class Defense(NamedTuple):
    """A rule as a pair of pure functions, like an optax transformation."""

    init: Callable[[], PyTree]  # the rule's memory: fixed-shape arrays, () if none
    apply: Callable[[RoundView, PyTree], tuple[Verdict, PyTree]]  # pure, jittable
    root_size: int  # examples of the server's clean root set the round trains on (FLTrust); 0: none
    flags_clients: bool  # flags are meaningful (detection precision/recall)


def require(ok: bool, field: str, need: str, got) -> None:
    """A factory's check of its own argument `field` (the registry names it as the config
    field `defense.<rule>.<field>`)."""
    if not ok:
        raise ValueError(f"{field} must be {need}, got {got!r}")


def require_two_clients(k: int) -> None:
    """A rule that compares clients with each other needs two of them a round."""
    if k < 2:
        raise ValueError(f"needs k >= 2 clients per round (rows), got k={k}")


def require_mode(mode: str) -> None:
    require(mode in MODES, "mode", f"one of {list(MODES)}", mode)


def no_memory() -> tuple:
    return ()


def uniform(k: int) -> jax.Array:
    return jnp.full((k,), 1.0 / k, jnp.float32)


def weighted_mean(updates: jax.Array, keep: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Mean of `updates` [k, d] weighted by `keep` [k] >= 0 -> (delta [d], weights [k]).

    A row with weight 0 takes no part, even if it is not finite. If every weight is zero
    the round adds nothing: delta 0 and weights all 0.
    """
    keep = jnp.where(keep > 0, keep.astype(jnp.float32), 0.0)
    total = keep.sum()
    weights = keep / jnp.where(total > 0, total, 1.0)
    rows = jnp.where(keep[:, None] > 0, updates, 0.0)
    return weights @ rows, weights


def make_verdict(delta, weights, *, flags=None, scores=None, block=None, valid=None) -> Verdict:
    """A Verdict with the unset fields filled (no flags, zero scores, no block) and the
    invalid rows (valid [k] False) given weight 0, no flag and score 0."""
    k = weights.shape[0]
    valid = jnp.ones((k,), bool) if valid is None else valid
    none = jnp.zeros((k,), bool)
    flags = none if flags is None else flags.astype(bool)
    scores = jnp.zeros((k,), jnp.float32) if scores is None else scores.astype(jnp.float32)
    return Verdict(
        delta=delta,
        weights=jnp.where(valid, weights, 0.0).astype(jnp.float32),
        flags=flags & valid,
        scores=jnp.where(valid, scores, 0.0),
        block=none if block is None else block.astype(bool),
    )


def flagging_verdict(
    updates, flags, scores, mode: str, aggregate, block=None, valid=None
) -> Verdict:
    """Verdict of a rule that flags clients.

    mode 'detect': report flags and scores, aggregate with plain FedAvg over the valid rows.
    mode 'filter' / 'block': aggregate with the rule's own `aggregate` = (delta, weights).
    """
    k = updates.shape[0]
    valid = jnp.ones((k,), bool) if valid is None else valid
    if mode == "detect":
        delta, weights = weighted_mean(updates, valid.astype(jnp.float32))
    else:
        delta, weights = aggregate
    return make_verdict(delta, weights, flags=flags, scores=scores, block=block, valid=valid)


def cosine_matrix(x: jax.Array) -> jax.Array:
    """Pairwise cosine similarity of the rows of x [m, p] -> [m, m]; zero rows give 0."""
    unit = unit_rows(x)
    return unit @ unit.T


def detection_counts(flags: jax.Array, is_malicious: jax.Array) -> jax.Array:
    """Confusion counts of flags against the truth -> [4] int32 (tp, fp, fn, tn)."""
    f, m = flags.astype(bool), is_malicious.astype(bool)
    counts = [f & m, f & ~m, ~f & m, ~f & ~m]
    return jnp.stack([c.sum() for c in counts]).astype(jnp.int32)


def auc(scores: jax.Array, labels: jax.Array, valid: jax.Array) -> jax.Array:
    """Area under the ROC curve of `scores` [m] for `labels` [m] (True = positive).

    Rank-based (Mann-Whitney U, ties count one half); entries with valid=False are ignored.
    NaN when the valid entries hold no positive or no negative.
    """
    scores = scores.astype(jnp.float32)
    ordered = jnp.sort(jnp.where(valid, scores, jnp.inf))
    below = jnp.searchsorted(ordered, scores, side="left")
    upto = jnp.searchsorted(ordered, scores, side="right")
    midrank = (below + upto + 1).astype(jnp.float32) / 2  # 1-based, ties averaged
    pos, neg = labels & valid, ~labels & valid
    n_pos, n_neg = pos.sum().astype(jnp.float32), neg.sum().astype(jnp.float32)
    u = jnp.sum(jnp.where(pos, midrank, 0.0)) - n_pos * (n_pos + 1) / 2
    defined = (n_pos > 0) & (n_neg > 0)
    return jnp.where(defined, u / jnp.where(defined, n_pos * n_neg, 1.0), jnp.nan)
