"""CRFL (Xie, Chen, Chen and Li, ICML 2021, "CRFL: Certifiably robust federated learning
against backdoor attacks"): the server smooths the global model's parameters every round,
and a smoothed model's prediction comes with a certified radius against backdoors.

Training (`crfl`): the valid updates are averaged (FedAvg), then the new global model
w = w_global + mean is clipped to norm at most rho_t and N(0, sigma^2 I) noise is added to
every parameter. Clipping bounds how far one round can move the model; the noise makes
the parameters' distribution move little when a backdoor changes a few updates, which is
what the certificate measures.

Certification (`certified_radius`, Theorem 1 of the paper): a smoothed model predicting
class A with probability p_A, the runner-up B with p_B, keeps its prediction on an input
for every backdoor pattern of norm below

    RAD = sigma * sqrt(-ln(1 - (sqrt(p_A) - sqrt(p_B))^2)
                       / (2 L^2 prod_t (2 Phi(rho_t / sigma) - 1)))

with the product over the rounds from the one after the attack to the last, and L the
bound on how far the attackers move the parameters per unit of pattern at the attack
round (`attack_lipschitz`: the attackers' aggregation weights, their scale factor, the
learning rate, the local steps, the poisoned fraction of a batch and the loss's
Lipschitz constant in the input).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_poison.defenses.base import make_verdict, require
from fedjax_poison.defenses.numeric import masked_mean, norms, uniform_over
from fedjax_poison.defenses.robust import stateless
from fedjax_poison.errors import UserError

NOISE_STREAM = 0xC2F1  # CRFL's noise: a key of its own, folded with the round


class CertificationError(UserError, ValueError):
    """Probabilities or parameters a certificate cannot be computed for."""


def clip_bound(round_: jax.Array, clip_norm: float, clip_start: float, clip_growth: float):
    """[] rho_t = min(`clip_norm`, `clip_start` + `clip_growth` t) of round t (0-based)."""
    return jnp.minimum(clip_norm, clip_start + clip_growth * round_.astype(jnp.float32))


def crfl(
    *,
    clip_norm: float = 15.0,
    clip_start: float = 2.0,
    clip_growth: float = 0.1,
    noise_std: float = 0.01,
):
    """CRFL's training (Xie et al., ICML 2021; module docstring): FedAvg, then the global
    model clipped to norm rho_t = min(`clip_norm`, `clip_start` + `clip_growth` t) in round
    t and N(0, `noise_std`^2) added to each parameter: the paper's MNIST schedule (0.1 t +
    2, at most 15) and sigma 0.01, in parameter units. `clip_start` >= `clip_norm` gives a
    fixed bound.

    The noise key comes from the round alone (the same for every order of the clients, and
    after a resume). Flags nobody; scores are the updates' norms."""
    require(clip_norm > 0, "clip_norm", "> 0", clip_norm)
    require(clip_start > 0, "clip_start", "> 0", clip_start)
    require(clip_growth >= 0, "clip_growth", ">= 0", clip_growth)
    require(noise_std >= 0, "noise_std", ">= 0", noise_std)

    def aggregate(valid, updates, view):
        params = view.global_params + masked_mean(updates, valid)  # [d]
        rho = clip_bound(view.round, clip_norm, clip_start, clip_growth)
        size = norms(params[None])[0]
        clipped = params * jnp.minimum(1.0, rho / jnp.maximum(size, 1e-30))
        key = jax.random.fold_in(jax.random.key(NOISE_STREAM), view.round)
        noise = noise_std * jax.random.normal(key, params.shape, jnp.float32)
        delta = jnp.where(valid.any(), clipped + noise - view.global_params, 0.0)
        return make_verdict(delta, uniform_over(valid), scores=norms(updates), valid=valid)

    return stateless(aggregate)


def attack_lipschitz(
    *,
    attacker_weights: Sequence[float],
    scale: float,
    lr: float,
    local_steps: int,
    poison_fraction: float,
    loss_lipschitz: float,
) -> float:
    """L of `certified_radius`, the paper's bound on how far the R attackers of the attack
    round move the global parameters per unit of backdoor norm:
    sqrt(R sum_i p_i^2) gamma eta tau L_Z q_B / n_B, with p_i = `attacker_weights` (their
    aggregation weights, 1/k each under FedAvg), gamma = `scale` (their update's scale
    factor), eta = `lr`, tau = `local_steps`, q_B / n_B = `poison_fraction` (poisoned
    examples per batch) and L_Z = `loss_lipschitz` (the loss gradient's Lipschitz constant
    in the input)."""
    weights = np.asarray(attacker_weights, np.float64)
    if weights.ndim != 1 or not len(weights) or (weights < 0).any():
        raise CertificationError(f"attacker_weights must be R >= 1 weights >= 0, got {weights}")
    for name, value in [
        ("scale", scale),
        ("lr", lr),
        ("local_steps", local_steps),
        ("poison_fraction", poison_fraction),
        ("loss_lipschitz", loss_lipschitz),
    ]:
        if not (np.isfinite(value) and value > 0):
            raise CertificationError(f"{name} must be a finite number > 0, got {value!r}")
    spread = math.sqrt(len(weights) * float(np.sum(weights**2)))
    return spread * scale * lr * local_steps * loss_lipschitz * poison_fraction


def certified_radius(p_a, p_b, *, sigma: float, clip, lipschitz: float, rounds: int = 1):
    """The norm of backdoor pattern below which CRFL's smoothed model keeps its prediction
    (module docstring), for the smoothed model's probabilities `p_a` of its top class and
    `p_b` of the runner-up (floats or arrays of one shape, e.g. lower and upper confidence
    bounds from sampled noisy models), the noise's `sigma`, the clipping bound `clip` (rho)
    of each of the `rounds` rounds from the one after the attack to the last (or a
    sequence, one bound per round, `rounds` then left at 1) and the attack's `lipschitz`
    (attack_lipschitz). +inf where p_a = 1 and p_b = 0; 0 where p_a = p_b.

    Raises CertificationError unless 0 <= p_b <= p_a <= 1, p_a + p_b <= 1, and sigma,
    every clip and lipschitz are > 0."""
    p_a, p_b = np.asarray(p_a, np.float64), np.asarray(p_b, np.float64)
    if p_a.shape != p_b.shape:
        raise CertificationError(f"p_a {p_a.shape} and p_b {p_b.shape} must have one shape")
    ok = (0 <= p_b) & (p_b <= p_a) & (p_a <= 1) & (p_a + p_b <= 1 + 1e-12)
    if not ok.all():
        raise CertificationError(
            "probabilities must satisfy 0 <= p_b <= p_a <= 1 and p_a + p_b <= 1, got "
            f"p_a={p_a[~ok].flat[0]}, p_b={p_b[~ok].flat[0]}"
        )
    clips = np.atleast_1d(np.asarray(clip, np.float64))
    if clips.ndim != 1 or (clips.size > 1 and rounds != 1):
        raise CertificationError("clip is one bound (with rounds) or a sequence of bounds")
    if not (np.isfinite(clips).all() and (clips > 0).all()):
        raise CertificationError(f"clip must be > 0, got {clip!r}")
    if not (isinstance(rounds, int) and rounds >= 1):
        raise CertificationError(f"rounds must be an integer >= 1, got {rounds!r}")
    for name, value in [("sigma", sigma), ("lipschitz", lipschitz)]:
        if not (np.isfinite(value) and value > 0):
            raise CertificationError(f"{name} must be a finite number > 0, got {value!r}")
    contraction = math.prod(math.erf(c / sigma / math.sqrt(2)) for c in clips) ** (
        rounds if clips.size == 1 else 1
    )  # prod_t (2 Phi(rho_t / sigma) - 1)
    gap = (np.sqrt(p_a) - np.sqrt(p_b)) ** 2
    with np.errstate(divide="ignore"):
        hellinger = -np.log1p(-np.minimum(gap, 1.0))
    radius = sigma * np.sqrt(hellinger / (2 * lipschitz**2 * contraction))
    return radius if radius.ndim else float(radius)
