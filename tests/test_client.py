import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_poison import data, models
from fedjax_poison.round import client

SPEC = data.SPECS["fashion_mnist"]


def settings(**kw):
    base = dict(batch_size=4, local_epochs=1, momentum=0.9, augment=False)
    return client.TrainSettings(**{**base, **kw})


def test_lr_schedule_steps_and_floors():
    lr = lambda step: float(client.lr_at(jnp.int32(step), 1e-3, 0.1, 10, 1e-5))
    assert np.isclose(lr(0), 1e-3) and np.isclose(lr(9), 1e-3)
    assert np.isclose(lr(10), 1e-4) and np.isclose(lr(25), 1e-5)
    assert np.isclose(lr(100), 1e-5)  # floored at min_lr


def test_batch_order_visits_each_real_example_once_per_epoch():
    order, valid = client.batch_order(
        jax.random.key(0), jnp.int32(10), 12, settings(local_epochs=2)
    )
    assert order.shape == (6, 4) and valid.shape == (6, 4)
    per_epoch = np.asarray(order).reshape(2, 12)
    mask = np.asarray(valid).reshape(2, 12)
    for e in range(2):
        assert sorted(per_epoch[e][mask[e]].tolist()) == list(range(10))
        assert mask[e].sum() == 10
    assert (per_epoch[0] != per_epoch[1]).any()  # a fresh order each epoch


def test_augment_keeps_shape_and_crops_padding_in():
    x = jnp.ones((8, 32, 32, 3))
    out = client.augment_batch(jax.random.key(0), x)
    assert out.shape == x.shape
    assert float(out.min()) == 0.0  # zero padding shows up in some crops


def _tiny_problem(n=64):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 50, (n, 28, 28, 1)).astype(np.uint8)
    y = rng.integers(0, 2, n).astype(np.int32)
    x[y == 1, 10:18, 10:18] = 250  # a bright square means class 1
    return jnp.asarray(x), jnp.asarray(y)


@pytest.mark.slow  # the quick tier leaves launches and large compiles out
def test_local_training_lowers_the_loss_and_padding_changes_nothing():
    model = models.make_model(models.config_block("fashion_mnist_cnn"), 10)
    params, stats = models.init_variables(model, jax.random.key(0), (28, 28, 1))
    train = jax.jit(client.make_local_train(model, SPEC, settings(local_epochs=3)))
    x, y = _tiny_problem()
    first = train(params, stats, x, y, jnp.int32(64), 0.01, jax.random.key(1))
    again = train(first.params, first.batch_stats, x, y, jnp.int32(64), 0.01, jax.random.key(2))
    assert float(again.loss) < float(first.loss) < 1.0

    # 40 real examples + 24 padding rows of junk = the same as 40 examples alone? The
    # order differs, so compare instead with padding rows replaced by other junk.
    junk_a = x.at[40:].set(0).at[40:].set(255)
    junk_b = x.at[40:].set(7)
    ra = train(params, stats, junk_a, y, jnp.int32(40), 0.01, jax.random.key(3))
    rb = train(
        params, stats, junk_b, y.at[40:].set(1 - y[40:]), jnp.int32(40), 0.01, jax.random.key(3)
    )
    for a, b in zip(
        jax.tree.leaves((ra.params, ra.batch_stats)), jax.tree.leaves((rb.params, rb.batch_stats))
    ):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # the quick tier leaves launches and large compiles out
def test_vmapped_clients_in_chunks_equal_one_client_at_a_time():
    # 7 clients of batch 4 on CPU train in chunks of 5 and 2: each client's result must be
    # the one it gets alone.
    model = models.make_model(models.config_block("fashion_mnist_cnn"), 10)
    params, stats = models.init_variables(model, jax.random.key(0), (28, 28, 1))
    local_train = client.make_local_train(model, SPEC, settings())
    x, y = _tiny_problem(7 * 16)
    xs, ys = x.reshape(7, 16, 28, 28, 1), y.reshape(7, 16)
    counts = jnp.array([16, 12, 16, 9, 16, 16, 3], jnp.int32)
    keys = jax.random.split(jax.random.key(5), 7)
    together = jax.jit(jax.vmap(local_train, in_axes=(None, None, 0, 0, 0, None, 0)))(
        params, stats, xs, ys, counts, 0.01, keys
    )
    alone_fn = jax.jit(local_train)
    for i in range(7):
        alone = alone_fn(params, stats, xs[i], ys[i], counts[i], 0.01, keys[i])
        for a, b in zip(jax.tree.leaves(alone), jax.tree.leaves(together)):
            np.testing.assert_allclose(b[i], a, rtol=2e-4, atol=2e-5)
