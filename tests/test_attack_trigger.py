"""A3FL and IBA, whose trigger is optimized against the global model: their trigger steps
against float64 numpy transcriptions under a linear model on random inputs, how they stamp
it, and in a run: the trigger kept in the server state, evaluated as it stands, and saved
and restored with the checkpoint."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_attacks import IMAGE, C, K, N, make, round_inputs

from fedjax_poison import attacks, testing
from fedjax_poison.attacks import trigger_search
from fedjax_poison.config import configuration

P = int(np.prod(IMAGE))  # pixels of an image


def linear_round(seed: int, state, poisoned=(True, False, True)):
    """(x, y, count, ctx) of a round with a random linear global model and `state`."""
    x, y, count, _, ctx = round_inputs(poisoned=poisoned, seed=seed)
    rng = np.random.default_rng(seed + 10)
    params = {
        "head": {
            "kernel": jnp.asarray(rng.normal(size=(P, C)), jnp.float32),
            "bias": jnp.asarray(rng.normal(size=C) * 0.1, jnp.float32),
        }
    }
    loss = jax.tree_util.Partial(testing.linear_loss)
    return x, y, count, ctx._replace(state=state, params=params, model_loss=loss)


def softmax_grads(w, b, xb, yb):
    """(dL/dw, dL/db, dL/dxb) of the mean cross-entropy of softmax(xb / 255 w + b), float64."""
    z = xb / 255.0 @ w + b
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    d = (p - np.eye(w.shape[1])[yb]) / len(yb)
    return xb.T / 255.0 @ d, d.sum(0), d @ w.T / 255.0


def batches(ctx, count, salt, steps, batch):
    """The rows each step draws: the attack's own draw (tested below on its own)."""
    key = jax.random.fold_in(ctx.key, salt)
    return np.asarray(trigger_search.step_batches(key, count, ctx.poisoned, N, steps, batch))


# ---- A3FL (Zhang et al., NeurIPS 2023) ----


def ref_a3fl(t, x, y, w, b, index, adapt_index, target, lr, adapt_lr, lam, size):
    """Signed steps on L(global, t) + lam cos(global, adapted) L(adapted, t), the adapted
    model after SGD steps on the pasted images with true labels (float64)."""
    images, labels = x.reshape(-1, P).astype(np.float64), y.reshape(-1)
    m = trigger_search.patch_mask(size, IMAGE).reshape(-1).astype(np.float64)
    t = t.reshape(-1).astype(np.float64)
    paste = lambda t, xb: m * 255.0 * t + (1 - m) * xb
    wa, ba = w.copy(), b.copy()
    for rows in adapt_index:
        gw, gb, _ = softmax_grads(wa, ba, paste(t, images[rows]), labels[rows])
        wa, ba = wa - adapt_lr * gw, ba - adapt_lr * gb
    a, g = np.concatenate([ba, wa.ravel()]), np.concatenate([b, w.ravel()])
    cos = a @ g / (np.linalg.norm(a) * np.linalg.norm(g))
    for rows in index:
        xb, goal = paste(t, images[rows]), np.full(len(rows), target)
        grad = (softmax_grads(w, b, xb, goal)[2] * m * 255.0).sum(0)
        if len(adapt_index):
            grad += lam * cos * (softmax_grads(wa, ba, xb, goal)[2] * m * 255.0).sum(0)
        t = np.clip(t - lr * np.sign(grad), 0.0, 1.0)
    return t.reshape(IMAGE)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("adapt_steps", [0, 3])
def test_a3fl_trigger_steps_match_their_reference(seed, adapt_steps):
    fields = {"target": 1, "lr": 0.05, "steps": 4, "batch": 5, "adapt_steps": adapt_steps}
    fields.update(adapt_lr=0.5, lam=2.0, size=4)
    attack = make("a3fl", **{f"a3fl.{k}": v for k, v in fields.items()})
    start = jnp.asarray(np.random.default_rng(seed).uniform(0, 1, IMAGE), jnp.float32)
    x, y, count, ctx = linear_round(seed, start)
    learned = np.asarray(jax.jit(attack.learn)(x, y, count, ctx))
    k_trigger, k_adapt = jax.random.split(jax.random.fold_in(ctx.key, 0x7A16))
    index = trigger_search.step_batches(k_trigger, count, ctx.poisoned, N, 4, 5)
    adapt_index = trigger_search.step_batches(k_adapt, count, ctx.poisoned, N, adapt_steps, 5)
    w, b = (np.asarray(ctx.params["head"][n], np.float64) for n in ("kernel", "bias"))
    want = ref_a3fl(
        np.asarray(start), np.asarray(x), np.asarray(y), w, b, np.asarray(index),
        np.asarray(adapt_index), 1, 0.05, 0.5, 2.0, 4,
    )  # fmt: skip
    np.testing.assert_allclose(learned, want, atol=1e-6)
    mask = trigger_search.patch_mask(4, IMAGE).astype(bool)
    assert (learned[~mask[..., 0]] == np.asarray(start)[~mask[..., 0]]).all()  # off the patch
    assert (learned[mask[..., 0]] != np.asarray(start)[mask[..., 0]]).any()


def test_a3fl_steps_lower_the_target_loss_of_the_global_model():
    attack = make("a3fl", **{"a3fl.steps": 30, "a3fl.target": 3, "a3fl.adapt_steps": 0})
    x, y, count, ctx = linear_round(0, attack.init())
    learned = attack.learn(x, y, count, ctx)
    images = x.reshape(-1, *IMAGE)
    loss = lambda t: float(
        testing.linear_loss(ctx.params, attack.trigger(images, t).astype(jnp.float32),
                            jnp.full(len(images), 3))
    )  # fmt: skip
    assert loss(learned) < loss(attack.init()) - 0.1


def test_step_batches_draw_only_the_poisoning_clients_real_examples():
    count = jnp.asarray([6, 4, 2], jnp.int32)
    poisoned = jnp.asarray([False, True, True])
    rows = np.asarray(trigger_search.step_batches(jax.random.key(0), count, poisoned, N, 50, 8))
    allowed = {1 * N + i for i in range(4)} | {2 * N + i for i in range(2)}
    assert set(rows.ravel()) == allowed  # each of the 6 drawn in 400 draws, nothing else


def test_a3fl_pastes_its_current_trigger_on_the_chosen_share():
    x, y, count, _, ctx = round_inputs()
    attack = make("a3fl", **{"a3fl.share": 0.5, "a3fl.size": 3, "a3fl.target": 1})
    t = jnp.asarray(np.random.default_rng(3).uniform(0, 1, IMAGE), jnp.float32)
    got_x, got_y = attack.poison_data(x, y, count, ctx._replace(state=t))
    got_x, x = np.asarray(got_x), np.asarray(x)
    mask = trigger_search.patch_mask(3, IMAGE)[..., 0].astype(bool)
    pixels = np.round(255 * np.asarray(t)).astype(np.uint8)
    hit = np.asarray(got_y) != np.asarray(y)
    hit |= (got_x != x).reshape(K, N, -1).any(-1)
    for i in np.flatnonzero(np.asarray(ctx.poisoned)):
        chosen = np.flatnonzero(hit[i])
        assert len(chosen) == round(0.5 * int(count[i]))
        assert (chosen < int(count[i])).all() and (np.asarray(got_y)[i, chosen] == 1).all()
        for j in chosen:
            np.testing.assert_array_equal(got_x[i, j][mask], pixels[mask])
            np.testing.assert_array_equal(got_x[i, j][~mask], x[i, j][~mask])
    # Evaluation stamps the same trigger on every image.
    stamped = np.asarray(attacks.stamp(attack, jnp.asarray(x[0]), t))
    np.testing.assert_array_equal(stamped[:, mask], np.broadcast_to(pixels[mask], (N, 9, 1)))


# ---- IBA (Nguyen et al., NeurIPS 2023) ----


def ref_iba(delta, x, w, b, index, target, lr, eps):
    """Signed steps on the target's cross-entropy of clip(x + 255 delta, 0, 255), the
    gradient passing where the sum is strictly inside (float64)."""
    images = x.reshape(-1, P).astype(np.float64)
    delta = delta.reshape(-1).astype(np.float64)
    for rows in index:
        v = images[rows] + 255.0 * delta
        xb = np.clip(v, 0, 255)
        inside = (v > 0) & (v < 255)
        gx = softmax_grads(w, b, xb, np.full(len(rows), target))[2]
        delta = np.clip(delta - lr * np.sign((gx * inside * 255.0).sum(0)), -eps, eps)
    return delta.reshape(IMAGE)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("eps", [0.05, 0.3])
def test_iba_trigger_steps_match_their_reference(seed, eps):
    fields = {"target": 2, "lr": 0.02, "steps": 5, "batch": 6, "eps": eps, "test_eps": eps}
    attack = make("iba", **{f"iba.{k}": v for k, v in fields.items()})
    rng = np.random.default_rng(seed)
    start = jnp.asarray(rng.uniform(-eps, eps, IMAGE), jnp.float32)
    x, y, count, ctx = linear_round(seed, start)
    learned = np.asarray(jax.jit(attack.learn)(x, y, count, ctx))
    index = batches(ctx, count, 0x1BA, 5, 6)
    w, b = (np.asarray(ctx.params["head"][n], np.float64) for n in ("kernel", "bias"))
    want = ref_iba(np.asarray(start), np.asarray(x), w, b, index, 2, 0.02, eps)
    np.testing.assert_allclose(learned, want, atol=1e-6)
    assert np.abs(learned).max() <= eps + 1e-7


def test_iba_adds_its_pattern_and_tests_at_the_smaller_eps():
    x, y, count, _, ctx = round_inputs()
    attack = make("iba", **{"iba.share": 1.0, "iba.eps": 0.2, "iba.test_eps": 0.05})
    delta = jnp.full(IMAGE, 0.2, jnp.float32)  # +51 grey levels, at test +12.75
    got_x, got_y = attack.poison_data(x, y, count, ctx._replace(state=delta))
    row = np.asarray(x)[0, 0].astype(int)
    np.testing.assert_array_equal(np.asarray(got_x)[0, 0], np.minimum(row + 51, 255))
    assert (np.asarray(got_y)[0, : int(count[0])] == 0).all()
    tested = np.asarray(attacks.stamp(attack, x[0, :1], delta))[0].astype(int)
    np.testing.assert_array_equal(tested, np.clip(np.round(row + 12.75), 0, 255))


def test_iba_projects_poisoning_updates_onto_the_ball():
    _, _, _, updates, ctx = round_inputs()
    updates = updates.at[0].multiply(10.0)  # norm far above 1; row 2 stays below
    sent = np.asarray(make("iba", **{"iba.radius": 1.0}).poison_updates(updates, ctx))
    u = np.asarray(updates)
    norms = np.linalg.norm(u, axis=1)
    np.testing.assert_allclose(sent[0], u[0] / norms[0], rtol=1e-6)
    np.testing.assert_allclose(sent[2], u[2] * min(1.0, 1.0 / norms[2]), rtol=1e-6)
    np.testing.assert_array_equal(sent[1], u[1])  # honest
    off = np.asarray(make("iba", **{"iba.radius": 0.0}).poison_updates(updates, ctx))
    np.testing.assert_array_equal(off, u)
    hostile = updates.at[0].set(jnp.nan)
    assert np.isnan(np.asarray(make("iba").poison_updates(hostile, ctx))[0]).all()


@pytest.mark.parametrize("name", ["a3fl", "iba"])
def test_the_trigger_stays_without_examples_or_with_a_diverged_model(name):
    attack = make(name, **{f"{name}.steps": 2, f"{name}.batch": 4})
    start = attack.init() + 0.01
    x, y, count, ctx = linear_round(0, start, poisoned=(True, False, False))
    learn = jax.jit(attack.learn)
    empty = learn(x, y, count.at[0].set(0), ctx)  # the one attacker holds nothing
    np.testing.assert_array_equal(empty, start)
    for bad in (jnp.nan, jnp.inf, 1e20):
        hostile = ctx._replace(
            params=jax.tree.map(lambda p, v=bad: jnp.full_like(p, v), ctx.params)
        )
        learned = np.asarray(learn(x, y, count, hostile))
        assert np.isfinite(learned).all(), bad
    moved = np.asarray(learn(x, y, count, ctx))  # one attacker with 6 examples: it moves
    assert (moved != np.asarray(start)).any()


# ---- Fields, chains, sets ----


@pytest.mark.parametrize(
    "name, field, value, words",
    [
        ("a3fl", "lr", float("nan"), "attack.a3fl.lr must be"),
        ("a3fl", "lr", 2.0, "attack.a3fl.lr must be in (0, 1]"),
        ("a3fl", "steps", 0, "attack.a3fl.steps must be an integer >= 1"),
        ("a3fl", "size", 30, "attack.a3fl.size must be in [1, 26]"),
        ("a3fl", "lam", float("inf"), "attack.a3fl.lam must be"),
        ("a3fl", "lam", -0.5, "attack.a3fl.lam must be a finite number >= 0"),
        ("a3fl", "adapt_lr", -1.0, "attack.a3fl.adapt_lr must be a finite number > 0"),
        ("iba", "eps", 1e20, "attack.iba.eps must be in (0, 1]"),
        ("iba", "test_eps", 0.5, "attack.iba.test_eps must be in (0, eps=0.3]"),
        ("iba", "radius", float("nan"), "attack.iba.radius must be"),
        ("iba", "radius", -1.0, "attack.iba.radius must be a finite number >= 0"),
        ("iba", "batch", 0, "attack.iba.batch must be an integer >= 1"),
    ],
)
def test_trigger_search_fields_stop_with_one_line(name, field, value, words):
    c = configuration.paper_config("fashion_mnist")
    c.attack.name = name
    c.attack[name][field] = value
    with pytest.raises(configuration.ConfigError, match=re.escape(words)) as e:
        configuration.validate(c)
    assert "\n" not in str(e.value)


def test_a3fl_and_iba_count_as_a_chains_one_backdoor():
    for pair in ("a3fl+backdoor", "iba+a3fl", "neurotoxin+iba"):
        with pytest.raises(attacks.AttackConfigError, match="at most one backdoor"):
            attacks.split_name(pair)


def test_a_set_and_a_chain_keep_each_attacks_own_state():
    small = {"a3fl.steps": 2, "a3fl.adapt_steps": 1, "a3fl.batch": 4, "iba.steps": 2}
    a3fl, iba, flip = make("a3fl", **small), make("iba", **small), make("label_flip")
    chained = make("a3fl+scale", **small)
    state = chained.init()
    assert len(state) == 2 and state[1] == () and state[0].shape == IMAGE
    x, y, count, ctx = linear_round(0, None)
    t = jax.jit(chained.learn)(x, y, count, ctx._replace(state=state))
    alone = ctx._replace(key=jax.random.fold_in(ctx.key, 0), state=a3fl.init())
    np.testing.assert_array_equal(t[0], jax.jit(a3fl.learn)(x, y, count, alone))
    # In a set, the chosen attack's state moves; the others' stay.
    initial = attacks.select([a3fl, iba, flip], 0).init()
    learn = jax.jit(
        lambda index, ctx: attacks.select([a3fl, iba, flip], index).learn(x, y, count, ctx)
    )
    for index, moved in ((0, 0), (1, 1), (2, None)):
        states = learn(jnp.int32(index), ctx._replace(state=initial))
        for i, (got, init) in enumerate(zip(states, initial)):
            same = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(got),
                                                            jax.tree.leaves(init)))  # fmt: skip
            assert same == (i != moved), (index, i)
    # Each experiment is measured by its own attack's trigger; the rest by the first one.
    evaluate = attacks.evaluation_trigger([flip, a3fl, iba])
    states = ((), jnp.full(IMAGE, 1.0), jnp.full(IMAGE, 0.1))
    images = x[0]
    for index, want in ((1, a3fl.trigger(images, states[1])), (2, iba.trigger(images, states[2])),
                        (0, a3fl.trigger(images, states[1]))):  # fmt: skip
        np.testing.assert_array_equal(evaluate(images, states, jnp.int32(index)), want)
    assert attacks.evaluation_trigger([flip]) is None


# ---- In a run ----


def two_rounds(c):
    """(plan, programs, advance, states after two rounds on the host, their confusion):
    the run of config c, its first group; advance(states) runs two more rounds."""
    from fedjax_poison.config import plan
    from fedjax_poison.runner import setup, train

    p = plan.build(c)
    programs = setup.build(p)
    seeds = jnp.asarray([e.seed for e in p.experiments], jnp.int32)
    scenarios = train._place(programs, train._pick(programs.scenarios, p.groups[0]))

    def advance(states):
        states = train._place(programs, jax.tree.map(jnp.asarray, states))
        data, test = programs.client_data, programs.test
        return programs.advance(states, scenarios, data, test, jnp.int32(2))

    states, _, confusion = advance(programs.init_states(seeds))
    return p, programs, advance, jax.device_get(states), confusion


def resumes_bit_for_bit(tmp_path, advance, states):
    """Saves states with a checkpoint and restores them (the attack state equal); two more
    rounds from either are the same to the bit. Returns the states after those rounds."""
    from fedjax_poison.runner import checkpoint

    saved = checkpoint.Checkpoints(str(tmp_path / "checkpoints"), num_rounds=4)
    saved.save(checkpoint.start(0, states, 0.0, 0, 0.0)._replace(round=2))
    restored = saved.restore(saved.latest(), states).states
    saved.close()
    for a, b in zip(jax.tree.leaves(restored.attack_state), jax.tree.leaves(states.attack_state)):
        np.testing.assert_array_equal(a, b)
    go_on, resumed = (jax.device_get(advance(s)[0]) for s in (states, restored))
    for a, b in zip(jax.tree.leaves(go_on), jax.tree.leaves(resumed)):
        np.testing.assert_array_equal(a, b)
    return go_on


@pytest.mark.slow  # compiles a whole run: a minute on 2 cores
def test_a_run_keeps_its_trigger_evaluates_it_and_resumes_it_from_a_checkpoint(tmp_path):
    from test_simulation import tiny_config

    from fedjax_poison import models
    from fedjax_poison.round import metrics

    c = tiny_config(num_rounds=4, eval_every=2)
    c.attack.name, c.attack.malicious_fraction = "a3fl", 0.5
    c.attack.a3fl.update(steps=3, adapt_steps=1, batch=16, size=4)
    p, programs, advance, states, confusion = two_rounds(c)
    t = states.attack_state[0]  # [H, W, C]: the experiment's trigger after two rounds
    mask = trigger_search.patch_mask(4, t.shape)[..., 0].astype(bool)
    assert (t[~mask] == 0.5).all() and (t[mask] != 0.5).any()  # it moved, on its patch only
    # The triggered test set is the current trigger's.
    model = models.make_model(p.model, p.spec.num_classes)
    evaluate = metrics.make_evaluate(model, p.spec)
    x, y, m = programs.test
    stamped = programs.attack_of[0].trigger(x, jnp.asarray(t))
    want = evaluate(
        jax.tree.map(lambda a: a[0], states.params),
        jax.tree.map(lambda a: a[0], states.batch_stats),
        stamped,
        y,
        m,
    )
    np.testing.assert_array_equal(np.asarray(confusion)[0, 1], np.asarray(want))
    go_on = resumes_bit_for_bit(tmp_path, advance, states)
    assert not np.array_equal(go_on.attack_state, states.attack_state)
