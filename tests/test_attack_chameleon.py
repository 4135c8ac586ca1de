"""Chameleon (Dai & Li, ICML 2023): its supervised contrastive loss against a float64 numpy
transcription, the embedding the round offers (the last Dense layer's input, for the
paper's CNNs and a user's model), the crafted update on a tiny model, hostile rounds, and
in a run: the update kept in the server state, resumed bit for bit from a checkpoint."""

import dataclasses
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree
from test_attacks import IMAGE, make, round_inputs

from fedjax_poison import attacks, data, models
from fedjax_poison.attacks import contrastive
from fedjax_poison.config import configuration
from fedjax_poison.round import client, server


def ref_supcon(z, labels, tau):
    """The supervised contrastive loss as the paper writes it, anchor by anchor, float64;
    the mean over anchors, an anchor without positives counting 0 (the authors' code)."""
    z = np.asarray(z, np.float64)
    z = z / np.linalg.norm(z, axis=1, keepdims=True)
    b = len(z)
    losses = []
    for i in range(b):
        others = [a for a in range(b) if a != i]
        positives = [p for p in others if labels[p] == labels[i]]
        denominator = sum(np.exp(z[i] @ z[a] / tau) for a in others)
        terms = [np.log(np.exp(z[i] @ z[p] / tau) / denominator) for p in positives]
        losses.append(-np.mean(terms) if terms else 0.0)
    return np.mean(losses)


@pytest.mark.parametrize("seed, tau", [(0, 0.07), (1, 0.5), (2, 1.0)])
def test_the_contrastive_loss_matches_its_float64_transcription(seed, tau):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(12, 5))
    labels = np.array([2, 2, 2, 0, 0, 1, 1, 1, 3, 2, 0, 4])  # classes 3 and 4: no positive
    got = contrastive.supervised_contrastive(jnp.asarray(z, jnp.float32), jnp.asarray(labels), tau)
    np.testing.assert_allclose(float(got), ref_supcon(z, labels, tau), rtol=2e-5)


def test_the_loss_is_low_when_the_poisoned_sit_with_the_target_class():
    # Two poisoned images (labelled 1, the target): next to the target's images, or next
    # to their own class's (0): the paper's facilitators against its interferers.
    target, own = np.array([1.0, 0.0]), np.array([0.0, 1.0])
    labels = jnp.asarray([1, 1, 1, 1, 0, 0])  # poisoned, poisoned, target, target, own, own
    near = jnp.asarray(np.stack([target, target, target, target, own, own]))
    far = jnp.asarray(np.stack([own, own, target, target, own, own]))
    low, high = (float(contrastive.supervised_contrastive(z, labels, 0.07)) for z in (near, far))
    assert low < high - 1.0


# ---- The embedding the round offers ----


class UserModel(nn.Module):
    """A user's model: flax layers only, the output layer not named `head`."""

    num_classes: int = 3

    @nn.compact
    def __call__(self, x, train: bool = False, mask=None):
        x = nn.Conv(4, (3, 3))(x)
        x = nn.relu(nn.Dense(6)(x.reshape(x.shape[0], -1)))
        return nn.Dense(self.num_classes, name="out")(x)


def spec_for(shape, num_classes):
    return dataclasses.replace(data.SPECS["fashion_mnist"], image_shape=shape,
                               num_classes=num_classes)  # fmt: skip


@pytest.mark.parametrize(
    "name, shape, block",
    [
        ("fashion_mnist_cnn", (28, 28, 1), {}),
        ("fashion_mnist_cnn", (28, 28, 1), {"conv_impl": "xla"}),  # flax's nn.Dense
        ("cifar10_cnn", (32, 32, 3), {}),
        ("user", (8, 8, 1), {}),
    ],
)
@pytest.mark.slow  # the quick tier leaves launches and large compiles out
def test_the_features_are_the_input_of_the_last_dense_layer(name, shape, block):
    if name == "user":
        model, out = UserModel(), "out"
    else:
        model, out = models.make_model({**models.config_block(name), **block}, 10), models.HEAD
    params, stats = models.init_variables(model, jax.random.key(0), shape)
    spec = spec_for(shape, 10)
    x = jnp.asarray(np.random.default_rng(0).integers(0, 256, (3, *shape)), jnp.float32)
    embed = client.make_model_features(model, spec)
    both = lambda p: (embed(stats, p, x), model.apply({"params": p, "batch_stats": stats},
                                                      data.normalize(x, spec)))  # fmt: skip
    features, logits = jax.jit(both)(params)
    kernel, bias = params[out]["kernel"], params[out]["bias"]
    assert features.shape == (3, kernel.shape[0])
    np.testing.assert_allclose(features @ kernel + bias[None], logits, rtol=1e-4, atol=1e-4)
    if name == "cifar10_cnn":  # its gradient compiles for 20 s on 2 cores
        return
    # Differentiable in the parameters: the encoder's gradient reaches the first layer.
    grad = jax.jit(jax.grad(lambda p: jnp.sum(embed(stats, p, x))))(params)
    assert np.abs(np.asarray(jax.tree.leaves(grad)[0])).max() > 0


def test_a_model_without_a_dense_layer_stops_with_one_line():
    class NoDense(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool = False):
            return nn.Conv(2, (3, 3))(x).mean(axis=(1, 2))

    params = NoDense().init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))["params"]
    features = client.make_model_features(NoDense(), spec_for((8, 8, 1), 2))
    with pytest.raises(ValueError, match="calls no nn.Dense"):
        features({}, params, jnp.zeros((1, 8, 8, 1)))


# ---- The attack on a tiny model ----

SHAPE, CLASSES, TARGET = (8, 8, 1), 4, 1


def tiny_model():
    """(model, params, stats, loss, features) of a small MLP on 8 x 8 images, 4 classes."""
    model = models.make_model({**models.config_block("mlp"), "hidden": (16,)}, CLASSES)
    params, stats = models.init_variables(model, jax.random.key(0), SHAPE)
    spec = spec_for(SHAPE, CLASSES)
    loss = jax.tree_util.Partial(client.make_model_loss(model, spec), stats)
    features = jax.tree_util.Partial(client.make_model_features(model, spec), stats)
    return model, params, stats, loss, features


def class_images(rng, labels):
    """Images [b, 8, 8, 1] uint8 of labels [b]: class c is bright in row block c, noisy."""
    x = rng.integers(0, 60, (len(labels), *SHAPE))
    for i, c in enumerate(labels):
        x[i, 2 * c : 2 * c + 2] += 150
    return x.astype(np.uint8)


def tiny_attack(**fields):
    """Chameleon for the tiny model (its own d), with `fields` set."""
    cfg = attacks.default_config()
    cfg.chameleon.update(target=TARGET, size=2, **fields)
    params = tiny_model()[1]
    return attacks.make_attack("chameleon", cfg, num_classes=CLASSES, image_shape=SHAPE,
                               num_params=ravel_pytree(params)[0].size,
                               head_index=server.head_index(params))  # fmt: skip


def tiny_round(poisoned=(True, False, True), count=(40, 40, 40), seed=0):
    """(x [3, 40, 8, 8, 1], y, count, ctx with the tiny model) of a round."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, CLASSES, (3, 40))
    x = class_images(rng, y.reshape(-1)).reshape(3, 40, *SHAPE)
    _, params, _, loss, features = tiny_model()
    ctx = attacks.AttackContext(
        poisoned=jnp.asarray(poisoned),
        client_ids=jnp.asarray([4, 7, 9], jnp.int32),
        round=jnp.int32(3),
        key=jax.random.key(seed),
        flip=jnp.arange(CLASSES, dtype=jnp.int32),
        params=params,
        model_loss=loss,
        model_features=features,
    )
    return jnp.asarray(x), jnp.asarray(y, jnp.int32), jnp.asarray(count, jnp.int32), ctx


def success(model, params, stats, attack, state, seed=5):
    """Share of triggered images of classes other than the target predicted as the target."""
    rng = np.random.default_rng(seed)
    labels = rng.choice([c for c in range(CLASSES) if c != TARGET], 200)
    images = attack.trigger(jnp.asarray(class_images(rng, labels)), state)
    spec = spec_for(SHAPE, CLASSES)
    logits = model.apply({"params": params, "batch_stats": stats}, data.normalize(images, spec))
    return float(jnp.mean(jnp.argmax(logits, -1) == TARGET))


def trained_params(steps=200, lr=0.1):
    """The tiny model's parameters after `steps` SGD steps on 2,000 clean images: a global
    model that tells the classes apart (the paper attacks a model trained for 1,800 rounds)."""
    _, params, _, loss, _ = tiny_model()
    rng = np.random.default_rng(9)
    labels = rng.integers(0, CLASSES, 2000)
    images = jnp.asarray(class_images(rng, labels), jnp.float32)
    index = jnp.asarray(rng.integers(0, 2000, (steps, 64)))

    def step(p, rows):
        grad = jax.grad(loss)(p, images[rows], jnp.asarray(labels)[rows])
        return jax.tree.map(lambda a, g: a - lr * g, p, grad), None

    return jax.jit(lambda p: jax.lax.scan(step, p, index)[0])(params)


@pytest.mark.slow  # the quick tier leaves launches and large compiles out
def test_the_crafted_update_plants_the_backdoor_in_the_global_model():
    attack = tiny_attack()  # the paper's CIFAR-10 rates and steps, its 7 poisoned in 64
    x, y, count, ctx = tiny_round()
    params = trained_params()
    ctx = ctx._replace(params=params, state=attack.init())
    state = jax.jit(attack.learn)(x, y, count, ctx)
    update, fresh = state
    assert bool(fresh) and np.isfinite(update).all() and np.abs(update).max() > 0
    model, _, stats, _, _ = tiny_model()
    flat, unravel = ravel_pytree(params)
    before = success(model, params, stats, attack, state)
    after = success(model, unravel(flat + update), stats, attack, state)
    assert after > before + 0.2, (before, after)  # 0.0 -> 0.34
    # Both stages move the model: the encoder's layer and the output layer.
    moved = unravel(update)
    assert all(np.abs(np.asarray(a)).max() > 0 for a in jax.tree.leaves(moved))
    # The update seam sends it from the poisoning rows, the honest row as it was.
    rows = jnp.asarray(np.random.default_rng(0).normal(size=(3, flat.size)), jnp.float32)
    sent = np.asarray(attack.poison_updates(rows, ctx._replace(state=state)))
    np.testing.assert_array_equal(sent[[0, 2]], np.stack([update, update]))
    np.testing.assert_array_equal(sent[1], rows[1])


def test_the_update_is_projected_onto_the_radius():
    x, y, count, ctx = tiny_round()
    attack = tiny_attack(encoder_lr=0.05, head_lr=0.1, encoder_steps=4, head_steps=4, radius=0.05)
    update, _ = jax.jit(attack.learn)(x, y, count, ctx._replace(state=attack.init()))
    np.testing.assert_allclose(np.linalg.norm(update), 0.05, rtol=1e-5)  # it was longer


def test_a_round_nobody_poisons_leaves_the_rows_and_the_state():
    attack = tiny_attack(encoder_steps=2, head_steps=2)
    x, y, count, ctx = tiny_round(poisoned=(False, False, False))
    state = (jnp.full(attack.init()[0].shape, 0.25), jnp.ones((), bool))  # last round's
    learned = jax.jit(attack.learn)(x, y, count, ctx._replace(state=state))
    for got, want in zip(learned, state):
        np.testing.assert_array_equal(got, want)
    rows = jnp.ones((3, state[0].size), jnp.float32)
    np.testing.assert_array_equal(attack.poison_updates(rows, ctx._replace(state=learned)), rows)


def test_without_examples_the_poisoning_rows_keep_their_own_update():
    attack = tiny_attack(encoder_steps=2, head_steps=2)
    x, y, count, ctx = tiny_round(poisoned=(True, False, False), count=(0, 40, 40))
    state = (jnp.full(attack.init()[0].shape, 0.25), jnp.ones((), bool))  # last round's
    learned = jax.jit(attack.learn)(x, y, count, ctx._replace(state=state))
    assert not bool(learned[1])
    rows = jnp.ones((3, state[0].size), jnp.float32)
    np.testing.assert_array_equal(attack.poison_updates(rows, ctx._replace(state=learned)), rows)
    # One attacker without examples beside one with: both send the crafted update.
    x, y, count, ctx = tiny_round(poisoned=(True, False, True), count=(0, 40, 40))
    update, fresh = jax.jit(attack.learn)(x, y, count, ctx._replace(state=attack.init()))
    sent = np.asarray(attack.poison_updates(rows, ctx._replace(state=(update, fresh))))
    assert bool(fresh) and np.isfinite(update).all()
    np.testing.assert_array_equal(sent[[0, 2]], np.stack([update, update]))


@pytest.mark.parametrize("bad", [np.nan, np.inf, 1e20])
def test_a_diverged_global_model_gives_finite_rows(bad):
    attack = tiny_attack(encoder_steps=2, head_steps=2)
    x, y, count, ctx = tiny_round()
    hostile = ctx._replace(
        params=jax.tree.map(lambda p: jnp.full_like(p, bad), ctx.params), state=attack.init()
    )
    state = jax.jit(attack.learn)(x, y, count, hostile)
    rows = jnp.ones((3, state[0].size), jnp.float32)
    sent = np.asarray(attack.poison_updates(rows, hostile._replace(state=state)))
    assert np.isfinite(sent).all()


def test_outside_a_round_it_needs_the_model_and_sends_nothing():
    attack = tiny_attack()
    x, y, count, ctx = tiny_round()
    with pytest.raises(ValueError, match="model_features"):
        attack.learn(x, y, count, ctx._replace(model_features=None))
    rows = jnp.ones((3, attack.init()[0].size), jnp.float32)
    np.testing.assert_array_equal(attack.poison_updates(rows, ctx), rows)


def test_its_trigger_is_the_backdoors():
    for fields in ({}, {"pattern": "checkerboard", "size": 3}):
        mine = make("chameleon", **{f"chameleon.{k}": v for k, v in fields.items()})
        theirs = make("backdoor", **{f"backdoor.{k}": v for k, v in fields.items()})
        x = round_inputs()[0][0]  # [N, 8, 8, 1]
        np.testing.assert_array_equal(mine.trigger(x, mine.init()), theirs.trigger(x))
        assert mine.measure == "backdoor" and mine.target == 2
    evaluate = attacks.evaluation_trigger([attacks.make_attack(
        "none", attacks.default_config()), mine])  # fmt: skip
    states = ((), mine.init())
    np.testing.assert_array_equal(evaluate(x, states, jnp.int32(0)), theirs.trigger(x))
    assert IMAGE == x.shape[1:]


@pytest.mark.parametrize(
    "field, value, words",
    [
        ("tau", 0.0, "attack.chameleon.tau must be a finite number > 0"),
        ("tau", float("nan"), "attack.chameleon.tau must be"),
        ("share", 0.001, "attack.chameleon.share must be at least"),
        ("batch", 1, "attack.chameleon.batch must be an integer >= 2"),
        ("encoder_steps", -1, "attack.chameleon.encoder_steps must be an integer >= 0"),
        ("head_lr", 2.0, "attack.chameleon.head_lr must be in (0, 1]"),
        ("radius", -1.0, "attack.chameleon.radius must be a finite number >= 0"),
        ("size", 30, "attack.chameleon.size must be in [1, 26]"),
    ],
)
def test_its_fields_stop_with_one_line(field, value, words):
    c = configuration.paper_config("fashion_mnist")
    c.attack.name = "chameleon"
    c.attack.chameleon[field] = value
    with pytest.raises(configuration.ConfigError, match=re.escape(words)) as e:
        configuration.validate(c)
    assert "\n" not in str(e.value)


def test_it_counts_as_a_chains_one_backdoor():
    for pair in ("chameleon+backdoor", "a3fl+chameleon"):
        with pytest.raises(attacks.AttackConfigError, match="at most one backdoor"):
            attacks.split_name(pair)


# ---- In a run ----


@pytest.mark.slow  # compiles a whole run: a minute on 2 cores
def test_a_run_sends_the_crafted_update_and_resumes_it_from_a_checkpoint(tmp_path):
    from test_attack_trigger import resumes_bit_for_bit, two_rounds
    from test_simulation import tiny_config

    c = tiny_config(num_rounds=4, eval_every=2)
    c.attack.name, c.attack.malicious_fraction = "chameleon", 0.5
    c.attack.chameleon.update(encoder_steps=2, head_steps=2, batch=16, share=0.25)
    _, _, advance, states, confusion = two_rounds(c)
    update, fresh = states.attack_state
    assert np.isfinite(update).all() and np.abs(update).max() > 0
    assert np.asarray(confusion).shape[1] == 2  # the clean and the triggered test set
    resumes_bit_for_bit(tmp_path, advance, states)
