"""Rules aimed at backdoors rather than at outliers: weak differential privacy (Sun et al.
2019) and the robust learning rate (Ozdayi et al., AAAI 2021). Neither flags clients;
both read only the round's updates.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fedjax_poison.defenses.base import make_verdict, require
from fedjax_poison.defenses.numeric import masked_mean, norms, uniform_over
from fedjax_poison.defenses.robust import clip_scales, stateless

NOISE_STREAM = 0x5DC1A  # weak DP's noise: a key of its own, folded with the round


def weak_dp(*, clip_norm: float = 0.0, noise_std: float = 0.025):
    """Weak differential privacy (Sun et al., "Can you really backdoor federated
    learning?", 2019): each update clipped to norm at most `clip_norm` (0: the median norm
    of the valid updates), averaged, and Gaussian noise of standard deviation `noise_std`
    added to every coordinate of the aggregate (the paper's sigma = 0.025 on EMNIST; it is
    in parameter units, so a model's scale decides how much it costs).

    The noise key is derived from the round alone (the same for every order of the
    clients). Flags nobody; scores are the updates' norms."""
    require(clip_norm >= 0, "clip_norm", ">= 0 (0: median norm)", clip_norm)
    require(noise_std >= 0, "noise_std", ">= 0", noise_std)

    def aggregate(valid, updates, view):
        scale = clip_scales(updates, valid, clip_norm)
        mean = masked_mean(scale[:, None] * updates, valid)
        key = jax.random.fold_in(jax.random.key(NOISE_STREAM), view.round)
        noise = noise_std * jax.random.normal(key, mean.shape, jnp.float32)
        delta = jnp.where(valid.any(), mean + noise, 0.0)
        return make_verdict(delta, uniform_over(valid), scores=norms(updates), valid=valid)

    return stateless(aggregate)


def robust_lr(*, clients_per_round: int, threshold: int = 0):
    """Robust learning rate (Ozdayi, Kantarcioglu and Gel, AAAI 2021): per coordinate, the
    server's learning rate is +1 where |sum of the valid updates' signs| >= theta and -1
    elsewhere, times the mean of the valid updates. theta = `threshold`, a count of
    clients as in the paper; 0: ceil(0.4 n) for n valid rows, the paper's 4 of 10 agents on
    Fashion-MNIST scaled to the round (a fixed 4 with 5 clients a round would ask for
    all five to agree, and one dissenting attacker would reverse every coordinate).

    The rule needs no memory: the paper's learning rate is decided afresh each round from
    that round's signs. Flags nobody; weights are 1/n (the reversal is not a share), scores
    the fraction of coordinates on which a client's sign goes against the majority."""
    k = clients_per_round
    require(0 <= threshold <= k, "threshold", f"in [0, k={k}] (0: ceil(0.4 n))", threshold)

    def aggregate(valid, updates, view):
        n = valid.sum().astype(jnp.float32)
        theta = jnp.ceil(0.4 * n - 1e-6) if threshold == 0 else jnp.float32(threshold)
        signs = jnp.where(valid[:, None], jnp.sign(updates), 0.0)
        agree = jnp.abs(jnp.sum(signs, axis=0))
        rate = jnp.where(agree >= theta, 1.0, -1.0)
        delta = rate * masked_mean(updates, valid)
        majority = jnp.sign(jnp.sum(signs, axis=0))
        against = jnp.mean(signs * majority[None, :] < 0, axis=1).astype(jnp.float32)
        return make_verdict(delta, uniform_over(valid), scores=against, valid=valid)

    return stateless(aggregate)
