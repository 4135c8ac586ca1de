"""Cross-device federations: ragged client data, local work that pays for its own examples,
fixed local steps, and populations of 100,000 clients."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_simulation import tiny_config as simulation_config

from fedjax_poison import data, defenses, models
from fedjax_poison.config import plan
from fedjax_poison.errors import UserError
from fedjax_poison.round import client
from fedjax_poison.runner import setup, train

SPEC = data.SPECS["fashion_mnist"]


def settings(**kw):
    base = dict(batch_size=4, local_epochs=2, momentum=0.0, augment=False)
    return client.TrainSettings(**{**base, **kw})


def _model():
    model = models.make_model(models.config_block("mlp"), 10)
    params, stats = models.init_variables(model, jax.random.key(0), (28, 28, 1))
    return model, params, stats


def _examples(n, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 255, (n, 28, 28, 1)).astype(np.uint8)
    return jnp.asarray(x), jnp.asarray(rng.integers(0, 10, n).astype(np.int32))


def _by_hand(model, params, x, y, count, lr, key, s: client.TrainSettings):
    """Plain SGD over the batches batch_order lists: (params, steps that carried data)."""
    positions, valid = client.batch_order(jax.random.split(key)[0], count, x.shape[0], s)

    def loss(p, xb, yb, m):
        logits = model.apply({"params": p}, data.normalize(xb, SPEC), train=True, mask=m)
        per = -jax.nn.log_softmax(logits)[jnp.arange(len(yb)), yb]
        return jnp.sum(per * m) / jnp.maximum(m.sum(), 1)

    steps = 0
    for idx, m in zip(np.asarray(positions), np.asarray(valid)):
        if not m.any():
            continue
        grads = jax.grad(loss)(params, x[idx], y[idx], jnp.asarray(m, jnp.float32))
        params = jax.tree.map(lambda p, g: p - lr * g, params, grads)
        steps += 1
    return params, steps


def _close(a, b, tol=1e-5):
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(u, v, rtol=tol, atol=tol)


@pytest.mark.parametrize("count", [3, 9, 16])
@pytest.mark.slow  # the quick tier leaves launches and large compiles out
def test_fixed_steps_train_exactly_that_many_full_batches(count):
    model, params, stats = _model()
    s = settings(local_steps=5)
    x, y = _examples(16)
    positions, valid = client.batch_order(jax.random.key(1), jnp.int32(count), 16, s)
    assert positions.shape == (5, 4) and bool(valid.all())
    stream = np.asarray(positions).reshape(-1)
    assert stream.max() < count
    for start in range(0, 20 - count + 1, count):  # every pass holds each example once
        assert sorted(stream[start : start + count]) == list(range(count))
    got = jax.jit(client.make_local_train(model, SPEC, s))(
        params, stats, x, y, jnp.int32(count), 0.05, jax.random.key(2)
    )
    want, steps = _by_hand(model, params, x, y, jnp.int32(count), 0.05, jax.random.key(2), s)
    assert steps == 5
    _close(got.params, want)


@pytest.mark.parametrize("ragged", [False, True])
@pytest.mark.slow  # the quick tier leaves launches and large compiles out
def test_epochs_train_each_client_for_its_own_steps(ragged):
    # Clients of 3, 9 and 16 examples in a buffer of 16, batch 4, 2 epochs: 2, 6 and 8 steps,
    # whether the loop stops at the client's own steps (ragged) or masks the rest (padded).
    model, params, stats = _model()
    s = settings(ragged=ragged)
    x, y = _examples(16)
    train = jax.jit(client.make_local_train(model, SPEC, s))
    for count, expected in [(3, 2), (9, 6), (16, 8)]:
        got = train(params, stats, x, y, jnp.int32(count), 0.05, jax.random.key(3))
        want, steps = _by_hand(model, params, x, y, jnp.int32(count), 0.05, jax.random.key(3), s)
        assert steps == expected == int(client.steps_of(count, s))
        _close(got.params, want)


def test_round_waste_counts_the_steps_of_sorted_groups():
    steps = np.array([1, 10, 1, 1])
    assert client.round_waste(steps, 1) == 1.0
    assert client.round_waste(steps, 2) == (2 * 10 + 2 * 1) / 13
    assert client.round_waste(steps, 0) == 4 * 10 / 13
    assert client.round_waste(steps, 0, bound=20) == 4 * 20 / 13


def tiny_config(**overrides):
    """test_simulation's tiny run over 20 Dirichlet(0.3) clients, 6 a round, with the MLP."""
    settings = {
        "data.synthetic_train": 600,
        "num_clients": 20,
        "clients_per_round": 6,
        "num_rounds": 2,
        "model.name": "mlp",
        "data.partition": "dirichlet",
        "data.dirichlet.alpha": 0.3,
        "attack.malicious_fraction": 0.2,
    }
    return simulation_config(**{**settings, **overrides})


def _two_rounds(config, padded=False, monkeypatch=None):
    """The states after 2 rounds, built as a run builds them; padded: every client runs the
    steps of the largest (today's padded layout)."""
    if padded:
        monkeypatch.setattr(setup, "train_settings", lambda p, sizes: p.train)
    p = plan.build(config)
    programs = setup.build(p)
    group = p.groups[0]
    seeds = jnp.asarray([p.experiments[e].seed for e in group], jnp.int32)
    states = train._place(programs, programs.init_states(seeds))
    scenarios = train._place(programs, train._pick(programs.scenarios, group))
    states, records, _ = programs.advance(
        states, scenarios, programs.client_data, programs.test, jnp.int32(2)
    )
    return jax.device_get(states.params), jax.device_get(records), programs


@pytest.mark.slow  # the quick tier leaves launches and large compiles out
def test_ragged_round_equals_the_padded_layout_on_the_same_clients(monkeypatch):
    config = tiny_config()
    ragged, records, programs = _two_rounds(config)
    sizes = programs.client_sizes
    assert sizes.min() < sizes.max()  # unequal clients
    padded, padded_records, _ = _two_rounds(config, padded=True, monkeypatch=monkeypatch)
    np.testing.assert_array_equal(records.selected, padded_records.selected)
    _close(ragged, padded, tol=2e-5)


@pytest.mark.parametrize("at_once", [1, 4, 6])
@pytest.mark.slow  # the quick tier leaves launches and large compiles out
def test_clients_trained_at_once_or_in_groups_give_the_same_model(at_once):
    reference, _, _ = _two_rounds(tiny_config(clients_at_once=6))
    if at_once != 6:
        _close(_two_rounds(tiny_config(clients_at_once=at_once))[0], reference, tol=2e-5)


@pytest.mark.slow  # the quick tier leaves launches and large compiles out
def test_fixed_steps_round_equals_the_padded_layout(monkeypatch):
    config = tiny_config(local_steps=3)
    ragged, _, programs = _two_rounds(config)
    assert programs.examples_per_round == 3 * 4 * 6  # S x B x k: each client trains S batches
    padded, _, _ = _two_rounds(config, padded=True, monkeypatch=monkeypatch)
    _close(ragged, padded, tol=2e-5)


def test_foolsgold_refuses_a_federation_it_cannot_hold_saying_how_much_memory():
    cfg = {"name": "foolsgold"}
    with pytest.raises(UserError, match=r"N=100000 clients that is 37\.\d GiB"):
        defenses.make_defense(
            cfg,
            num_clients=100_000,
            clients_per_round=50,
            num_params=1000,
            num_classes=10,
            head_features=100,
        )


@pytest.mark.slow
def test_a_hundred_thousand_clients_run_rounds(tmp_path):
    # 100,000 clients of 1 to a few examples each, 0.01% malicious: 10 attackers, so that
    # most rounds hold none and the measures stay defined.
    c = tiny_config(
        num_clients=100_000,
        clients_per_round=20,
        num_rounds=4,
        **{
            "data.synthetic_train": 200_000,
            "data.synthetic_test": 200,
            "data.dirichlet.alpha": 1.0,
            "attack.malicious_fraction": 0.0001,
            "tensorboard": False,
        },
    )
    summary = train.train_and_evaluate(c, str(tmp_path))
    (row,) = summary["final"]
    assert 0 < row["accuracy"] <= 1
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["round"] for r in rows] == [2, 4]
    assert sum(r["malicious_selected"] for r in rows) <= 1  # 20 of 100,000 a round
    malicious = json.load(open(tmp_path / "experiments.json"))[0]["malicious_clients"]
    assert len(malicious) == 10
