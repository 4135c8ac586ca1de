"""Pre-aggregators, and their composition with a rule: `defense.name = 'nnm+krum'`.

A pre-aggregator maps the round's view to a view of m rows, each a mix of the clients'
updates: rows = M @ updates with a mixing matrix M [m, k] (zero columns for invalid
clients), like an optax transformation in a chain. The last part of a chain is an
aggregator (a `Defense`), which judges the m rows; `chain` maps its verdict back to the k
clients:

- weights: client weight = verdict weights @ S, S = M with each row scaled to sum 1 (a
  client's share of each row; clipping shrinks a row but keeps whose it is), renormalised
  over the valid clients;
- flags and scores: a client is flagged when a row it owns is flagged, and takes the
  largest score of its rows. A pre-aggregator whose rows stand for clients (`norm_clipping`,
  `nnm`, `arc`: row i is client i's) keeps ownership as it is; `bucketing` gives every
  client of a bucket the bucket's row;
- mode 'detect' with a flagging rule: the aggregate is plain FedAvg of the valid clients.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from fedjax_poison.defenses.base import (
    Defense,
    RoundView,
    Verdict,
    make_verdict,
    require,
    weighted_mean,
)
from fedjax_poison.defenses.numeric import (
    clean,
    hash32,
    lowest_shares,
    norms,
    scale_of,
    sq_distances,
)
from fedjax_poison.defenses.robust import clip_scales

PyTree = Any
BUCKET_STREAM = 0xB0C  # bucketing's order: hashed with the round and the client id


class PreAggregator(NamedTuple):
    """A stage before the aggregator, as a pair of pure functions."""

    init: Callable[[], PyTree]  # memory: fixed-shape arrays, () if none
    # (view [k rows], memory) -> (view [m rows], mix [m, k], memory); pure, jittable
    apply: Callable[[RoundView, PyTree], tuple[RoundView, jax.Array, PyTree]]
    rows_are_clients: bool  # m == k and row i stands for client i
    rows: int  # m: the rows it passes on, of the k it receives


def mixed(view: RoundView, mix: jax.Array, valid: jax.Array, ids: jax.Array) -> RoundView:
    """The view of the rows mix [m, k] @ updates, with their validity [m] and ids [m]."""
    sent, updates = clean(view)
    heads = jnp.where(sent[:, None, None], view.head_rows, 0.0)
    return view._replace(
        updates=mix @ updates,
        head_rows=jnp.einsum("mk,kcf->mcf", mix, heads),
        client_ids=ids.astype(jnp.int32),
        valid=valid,
    )


def clipping(*, clients_per_round: int, clip_norm: float = 0.0) -> PreAggregator:
    """`norm_clipping` before another rule: each valid row scaled to norm at most
    `clip_norm` (0: the median norm of the valid rows), then passed on (Sun et al., 2019)."""
    require(clip_norm >= 0, "clip_norm", ">= 0 (0: median norm)", clip_norm)

    def apply(view, memory):
        valid, updates = clean(view)
        mix = jnp.diag(clip_scales(updates, valid, clip_norm))
        return mixed(view, mix, valid, view.client_ids), mix, memory

    return PreAggregator(lambda: (), apply, rows_are_clients=True, rows=clients_per_round)


def bucketing(*, clients_per_round: int, bucket_size: int = 2) -> PreAggregator:
    """Bucketing (Karimireddy, He and Jaggi, ICLR 2022): the valid rows in a random order,
    cut into buckets of s = `bucket_size`, each bucket's mean one row -> ceil(k / s) rows
    (the last bucket may be smaller; buckets with no valid row are invalid rows).

    The order sorts each client by a hash of the round and its client id (ties, if any, by
    id): deterministic, the same for every ordering of the rows, and an invalid
    client changes no other client's place. The rule after it keeps f = `num_byzantine`:
    each attacker spoils at most one bucket.
    """
    require(bucket_size >= 1, "bucket_size", ">= 1", bucket_size)

    def apply(view, memory):
        valid = clean(view)[0]
        k, ids = valid.shape[0], view.client_ids
        m = -(-k // bucket_size)
        seed = hash32(hash32(view.round.astype(jnp.uint32)) ^ jnp.uint32(BUCKET_STREAM))
        draw = hash32(seed ^ hash32(ids.astype(jnp.uint32)))  # [k] uint32
        ahead = (draw[None, :] < draw[:, None]) | (
            (draw[None, :] == draw[:, None]) & (ids[None, :] < ids[:, None])
        )
        place = jnp.sum(ahead & valid[None, :], axis=1)
        bucket = jnp.where(valid, place // bucket_size, m)
        member = bucket[None, :] == jnp.arange(m)[:, None]  # [m, k]
        size = member.sum(axis=1)
        mix = member / jnp.maximum(size, 1)[:, None].astype(jnp.float32)
        first = jnp.min(jnp.where(member, ids[None, :], jnp.iinfo(jnp.int32).max), axis=1)
        return mixed(view, mix, size > 0, jnp.where(size > 0, first, -1)), mix, memory

    rows = -(-clients_per_round // bucket_size)
    return PreAggregator(lambda: (), apply, rows_are_clients=False, rows=rows)


def nnm(*, clients_per_round: int, num_byzantine: int = 1) -> PreAggregator:
    """Nearest Neighbor Mixing (Allouah et al., AISTATS 2023): each valid row replaced by the
    mean of its n - f nearest valid rows, itself included (n the valid rows, f =
    `num_byzantine`, at least one). Rows at equal distance at the cut share the places left.
    """
    require(num_byzantine >= 0, "num_byzantine", ">= 0", num_byzantine)
    k = clients_per_round
    need = f"< k/2: nnm averages the k-f nearest of k={k} rows"
    require(k > 2 * num_byzantine, "num_byzantine", need, num_byzantine)

    def apply(view, memory):
        valid, updates = clean(view)
        n = valid.sum()
        near = jnp.maximum(n - num_byzantine, jnp.minimum(n, 1))
        d2 = sq_distances(updates / scale_of(updates, valid))
        share = jax.vmap(lambda row: lowest_shares((row,), valid, near))(d2)  # [k, k]
        mix = jnp.where(valid[:, None], share / jnp.maximum(near, 1), 0.0)
        return mixed(view, mix, valid, view.client_ids), mix, memory

    return PreAggregator(lambda: (), apply, rows_are_clients=True, rows=clients_per_round)


def arc_count(n: jax.Array, num_byzantine: int) -> jax.Array:
    """ARC's number of rows to clip among n valid rows: floor(2 f / n * (n - f)), within
    [0, n - 1] (computed in integers: no rounding at the floor)."""
    clipped = (2 * num_byzantine * (n - num_byzantine)) // jnp.maximum(n, 1)
    return jnp.clip(clipped, 0, jnp.maximum(n - 1, 0))


def arc(*, clients_per_round: int, num_byzantine: int = 1) -> PreAggregator:
    """Adaptive Robust Clipping (Allouah et al. 2024, "Boosting robustness by clipping
    gradients in distributed learning"; ByzFL's ARC): the c = floor(2 f / n * (n - f))
    valid rows of largest norm are scaled to the norm of the
    largest one left (n the valid rows, f = `num_byzantine`); rows of equal norm at the cut
    are all at that norm already, so the result does not depend on their order."""
    require(num_byzantine >= 0, "num_byzantine", ">= 0", num_byzantine)
    need = f"< k/2: arc clips for f < n/2, k={clients_per_round}"
    require(2 * num_byzantine < clients_per_round, "num_byzantine", need, num_byzantine)

    def apply(view, memory):
        valid, updates = clean(view)
        size = jnp.where(valid, norms(updates), 0.0)
        descending = -jnp.sort(jnp.where(valid, -size, jnp.inf))
        bound = descending[arc_count(valid.sum(), num_byzantine)]
        scale = jnp.where(valid, jnp.minimum(1.0, bound / jnp.maximum(size, 1e-30)), 0.0)
        mix = jnp.diag(scale)
        return mixed(view, mix, valid, view.client_ids), mix, memory

    return PreAggregator(lambda: (), apply, rows_are_clients=True, rows=clients_per_round)


def _normalised(mix: jax.Array) -> jax.Array:
    total = jnp.abs(mix).sum(axis=1, keepdims=True)
    return jnp.abs(mix) / jnp.where(total > 0, total, 1.0)


def to_clients(verdict: Verdict, share, owner, valid) -> Verdict:
    """The rows' verdict as the k clients' (module docstring): share [m, k], owner [m, k]."""
    weights = jnp.where(valid, verdict.weights @ share, 0.0)
    total = weights.sum()
    weights = weights / jnp.where(total > 0, total, 1.0)
    flags = jnp.any(owner & verdict.flags[:, None], axis=0)
    scores = jnp.max(jnp.where(owner, verdict.scores[:, None], -jnp.inf), axis=0)
    scores = jnp.where(owner.any(axis=0), scores, 0.0)
    return make_verdict(verdict.delta, weights, flags=flags, scores=scores, valid=valid)


def chain(parts: Sequence[PreAggregator], rule: Defense, mode: str) -> Defense:
    """The pre-aggregators `parts` in order, then `rule`, as one Defense over k clients.

    Memory: (the parts' memories, the rule's memory)."""

    def init():
        return tuple(p.init() for p in parts), rule.init()

    def apply(view, memory):
        valid, updates = clean(view)
        k = valid.shape[0]
        share, owner = jnp.eye(k, dtype=jnp.float32), jnp.eye(k, dtype=bool)
        memories, current = [], view
        for part, mem in zip(parts, memory[0]):
            current, mix, mem = part.apply(current, mem)
            memories.append(mem)
            share = _normalised(mix) @ share
            if not part.rows_are_clients:
                owner = ((mix != 0).astype(jnp.float32) @ owner.astype(jnp.float32)) > 0
        verdict, rule_memory = rule.apply(current, memory[1])
        verdict = to_clients(verdict, share, owner, valid)
        if mode == "detect" and rule.flags_clients:
            delta, weights = weighted_mean(updates, valid.astype(jnp.float32))
            verdict = verdict._replace(delta=delta, weights=weights)
        return verdict, (tuple(memories), rule_memory)

    return Defense(init, apply, root_size=rule.root_size, flags_clients=rule.flags_clients)
