"""LASA (Xu, Zhang and Hu, WACV 2025, "Achieving Byzantine-resilient federated learning via
layer-adaptive sparsified model aggregation"): sparsify every update, then choose, layer by
layer, the clients whose layer looks benign in magnitude and in direction, and average them.

Honest updates differ from layer to layer (a head's change is not a first convolution's),
so one outlier test over the whole update either misses an attacker who spoils a few
layers or drops honest clients for one odd layer; LASA tests each layer on its own.
A layer is one parameter array (a kernel, a bias), as in LASA's code, which filters each
tensor of the model's state dict: the run gives the rule the arrays' sizes in the flattened
update (`layer_sizes`, models.layer_sizes); built without them, the rule sees one layer.

On the valid updates of a round:
1. each is clipped to the round's median norm (LASA's code does it first), then
2. sparsified: its floor((1 - `sparsity`) d) entries of largest magnitude kept (at least
   one; entries tied with the last one kept are all kept), the rest zeroed;
3. per layer, a client's sparsified layer has a norm and a positive direction purity
   PDP = (1 + sum sign / sum |sign|) / 2 (1/2 for a layer left all zero). Each is turned
   into an MZ-score |x - median| / std over the valid clients (0 when std is 0); the client
   is kept for the layer when its norm's score is below `lambda_n` and its PDP's below
   `lambda_s`; when that keeps nobody, all are kept (as LASA's code does);
4. each layer of the aggregate is the mean of the kept clients' sparsified layers.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_poison.defenses.base import flagging_verdict, require, require_mode
from fedjax_poison.defenses.numeric import masked_median, scale_of
from fedjax_poison.defenses.robust import clip_scales, stateless


def sparsify(x: jax.Array, keep: int) -> jax.Array:
    """Each row of x [k, d] with only its `keep` entries of largest magnitude (and those
    tied with the last of them) left, the others zeroed."""
    size = jnp.abs(x)
    cut = jnp.sort(size, axis=1)[:, x.shape[1] - keep]  # [k] the keep-th largest magnitude
    return jnp.where(size >= cut[:, None], x, 0.0)


def mz_scores(x: jax.Array, valid: jax.Array) -> jax.Array:
    """|x - median| / std of each column of x [k, L] over its valid rows (population std;
    0 where the std is 0). The std sums the sorted values, so it is the same whatever the
    rows' order."""
    k = x.shape[0]
    median = masked_median(x, valid)  # [L]
    n = jnp.maximum(valid.sum(), 1)
    first = (jnp.arange(k) < valid.sum())[:, None]  # sorted: the valid values come first
    ordered = jnp.sort(jnp.where(valid[:, None], x, jnp.inf), axis=0)
    mean = jnp.sum(jnp.where(first, ordered, 0.0), axis=0) / n
    spread = jnp.where(first, ordered - mean[None, :], 0.0)
    std = jnp.sqrt(jnp.sum(spread * spread, axis=0) / n)
    score = jnp.abs(x - median[None, :]) / jnp.where(std > 0, std, 1.0)[None, :]
    return jnp.where(std[None, :] > 0, score, 0.0)


def layer_statistics(x: jax.Array, layer_of: np.ndarray, layers: int, valid: jax.Array):
    """(norms [k, L] in units of a common power of two, PDPs [k, L]) of the layers of the
    rows x [k, d]; layer_of [d] the layer of each coordinate."""
    s = scale_of(x, valid)
    per_layer = lambda v: jax.ops.segment_sum(v.T, layer_of, layers, indices_are_sorted=True).T
    norms = jnp.sqrt(per_layer((x / s) ** 2))
    signs, nonzero = per_layer(jnp.sign(x)), per_layer((x != 0).astype(x.dtype))
    pdp = (1 + signs / jnp.where(nonzero > 0, nonzero, 1.0)) / 2
    return norms, pdp


def lasa(
    *,
    num_params: int,
    layer_sizes: tuple,
    mode: str,
    sparsity: float = 0.3,
    lambda_n: float = 2.0,
    lambda_s: float = 1.0,
):
    """LASA (Xu, Zhang and Hu, WACV 2025; module docstring): top-k sparsification keeping
    1 - `sparsity` of each update's entries (0.3, the paper's), then per layer the clients
    whose norm's MZ-score is below `lambda_n` (2; the paper uses 1 on CIFAR) and whose
    PDP's is below `lambda_s` (1) averaged.

    Weights: a client's share of the aggregate's coordinates (each layer's 1/kept, weighted
    by the layer's size). Scores: the fraction of the parameters whose layer left the client
    out; flagged when that is more than half."""
    require(0 <= sparsity < 1, "sparsity", "in [0, 1) (the fraction of entries zeroed)", sparsity)
    require(lambda_n > 0, "lambda_n", "> 0", lambda_n)
    require(lambda_s > 0, "lambda_s", "> 0", lambda_s)
    require_mode(mode)
    sizes = np.asarray(layer_sizes, np.int64)
    layers = len(sizes)
    layer_of = np.repeat(np.arange(layers), sizes)  # [d]
    share = jnp.asarray(sizes / num_params, jnp.float32)  # [L] each layer's part of d
    keep_count = max(1, math.floor((1 - sparsity) * num_params + 1e-6))

    def aggregate(valid, updates, view):
        clipped = clip_scales(updates, valid, 0.0)[:, None] * updates
        sparse = sparsify(clipped, keep_count)
        norms, pdp = layer_statistics(sparse, layer_of, layers, valid)
        benign = (mz_scores(norms, valid) < lambda_n) & (mz_scores(pdp, valid) < lambda_s)
        benign = benign & valid[:, None]  # [k, L]
        anybody = benign.any(axis=0, keepdims=True)
        kept = jnp.where(anybody, benign, valid[:, None])  # nobody benign: all valid rows
        count = jnp.maximum(kept.sum(axis=0), 1)  # [L]
        per_coordinate = kept[:, layer_of]  # [k, d]
        delta = jnp.sum(jnp.where(per_coordinate, sparse, 0.0), axis=0) / count[layer_of]
        weights = jnp.sum(kept / count[None, :] * share[None, :], axis=1)
        scores = jnp.where(valid, jnp.sum(jnp.where(kept, 0.0, share[None, :]), axis=1), 0.0)
        flags = valid & (scores > 0.5)
        return flagging_verdict(updates, flags, scores, mode, (delta, weights), valid=valid)

    return stateless(aggregate, flags_clients=True)
