"""ALIE and IPM with the factor searched against the rule in use (alie_opt, ipm_opt),
against a float64 numpy transcription of ByzFL's LineMaximize, its ALittleIsEnough and
FallOfEmpires written for gradients (a gradient is about -update), on random inputs."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_attacks import make, round_inputs

from fedjax_poison.attacks.optimized import line_maximize
from fedjax_poison.config import configuration


def ref_line_maximize(evaluate, evals=16, start=0.0, delta=1.0, ratio=0.8):
    """ByzFL's LineMaximize.__call__: (best factor, every factor evaluated)."""
    tried = [start]
    best_x, best_y = start, evaluate(start)
    evals -= 1
    prop_x = best_x
    while evals > 0:  # expansion
        prop_x = best_x + delta
        prop_y = evaluate(prop_x)
        tried.append(prop_x)
        evals -= 1
        if prop_y > best_y:
            best_y, best_x = prop_y, prop_x
            delta *= 2
        else:
            delta *= ratio
            break
    while evals > 0:  # contraction
        if prop_x < best_x:
            prop_x += delta
        else:
            x = prop_x - delta
            while x < 0:
                x = (x + prop_x) / 2
            prop_x = x
        prop_y = evaluate(prop_x)
        tried.append(prop_x)
        evals -= 1
        if prop_y > best_y:
            best_y, best_x = prop_y, prop_x
        delta *= ratio
    return best_x, tried


def ref_optimized(g, poisoned, rule, attack):
    """The gradient the poisoning clients send: ByzFL's attack with its factor from
    LineMaximize against `rule` over the honest gradients and their copies."""
    honest = g[~poisoned]
    mean, std = honest.mean(0), honest.std(0, ddof=1)
    craft = {"alie": lambda tau: mean + tau * std, "ipm": lambda tau: (1 - (1 + tau)) * mean}
    craft = craft[attack]  # FallOfEmpires with tau = 1 + epsilon: -epsilon x mean

    def evaluate(factor):
        rows = g.copy()
        rows[poisoned] = craft(factor)
        return np.linalg.norm(rule(rows) - mean)

    best, _ = ref_line_maximize(evaluate)
    return craft(best)


RULES = {
    "median": (lambda x: np.median(x, axis=0), lambda u: jnp.median(u, axis=0)),
    "trimmed": (
        lambda x: np.sort(x, axis=0)[2:-2].mean(0),
        lambda u: jnp.sort(u, axis=0)[2:-2].mean(0),
    ),
    "mean": (lambda x: x.mean(0), None),  # None: the context's FedAvg
}


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("rule", sorted(RULES))
@pytest.mark.parametrize("attack", ["alie", "ipm"])
def test_optimized_attacks_match_byzfl(seed, rule, attack):
    rng = np.random.default_rng(seed)
    k, d = 9, 30
    poisoned = np.zeros(k, bool)
    poisoned[rng.choice(k, 3, replace=False)] = True
    updates = rng.normal(0.2, 1.0, (k, d)) * rng.uniform(0.5, 2.0, d)  # float64
    np_rule, jax_rule = RULES[rule]
    ctx = round_inputs()[4]._replace(
        poisoned=jnp.asarray(poisoned),
        aggregate=None if jax_rule is None else jax.tree_util.Partial(jax_rule),
    )
    sent = jax.jit(make(f"{attack}_opt").poison_updates)(jnp.asarray(updates, jnp.float32), ctx)
    want = -ref_optimized(-updates, poisoned, np_rule, attack)
    for row in np.flatnonzero(poisoned):
        np.testing.assert_allclose(sent[row], want, rtol=1e-4, atol=1e-4, err_msg=rule)
    np.testing.assert_array_equal(sent[~poisoned], updates[~poisoned].astype(np.float32))


def test_fedavg_is_pushed_without_bound():
    # Against the mean, every larger factor moves the aggregate farther: 15 expansions
    # from 0 by doubling steps, factor 2**15 - 1.
    x, y, count, updates, ctx = round_inputs(poisoned=(True, False, False))
    sent = make("ipm_opt").poison_updates(updates, ctx._replace(aggregate=None))
    honest_mean = np.asarray(updates)[1:].mean(0)
    np.testing.assert_allclose(sent[0], -(2**15 - 1) * honest_mean, rtol=1e-5)


@pytest.mark.parametrize("peak", [0.0, 0.37, 5.3, 40.0])
def test_the_search_keeps_the_best_factor_it_tried(peak):
    objective = lambda x: -((x - peak) ** 2)
    best, best_y = jax.jit(lambda: line_maximize(objective, 16, 0.0, 1.0, 0.8))()
    want, tried = ref_line_maximize(objective)
    assert float(best) == pytest.approx(want, rel=1e-5, abs=1e-6)
    assert float(best_y) == pytest.approx(max(objective(t) for t in tried), rel=1e-4, abs=1e-6)
    assert abs(float(best) - peak) < 0.5 + 0.1 * peak  # 16 evaluations get near one peak


def test_one_evaluation_sends_the_start():
    x, y, count, updates, ctx = round_inputs(poisoned=(True, False, False))
    sent = make("alie_opt", **{"alie_opt.evals": 1, "alie_opt.start": 2.0}).poison_updates(
        updates, ctx
    )
    honest = np.asarray(updates)[1:]
    want = honest.mean(0) - 2.0 * honest.std(0, ddof=1)
    np.testing.assert_allclose(sent[0], want, rtol=1e-5)


@pytest.mark.parametrize(
    "field, value, words",
    [
        ("alie_opt.evals", 0, "attack.alie_opt.evals must be an integer in [1, 100]"),
        ("alie_opt.ratio", 0.5, "attack.alie_opt.ratio must be in (0.5, 1)"),
        ("ipm_opt.delta", 0.0, "attack.ipm_opt.delta must be a finite number > 0"),
        ("ipm_opt.start", -1.0, "attack.ipm_opt.start must be a finite number >= 0"),
        ("ipm_opt.delta", 1e400, "attack.ipm_opt.delta must be"),
    ],
)
def test_search_fields_stop_with_one_line(field, value, words):
    c = configuration.paper_config("fashion_mnist")
    block, name = field.split(".")
    c.attack.name = block
    c.attack[block][name] = value
    with pytest.raises(configuration.ConfigError, match=re.escape(words)) as e:
        configuration.validate(c)
    assert "\n" not in str(e.value)
