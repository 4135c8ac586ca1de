import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_poison import models


def build(name, num_classes=10, **fields):
    return models.make_model({**models.config_block(name), **fields}, num_classes)


@pytest.mark.parametrize(
    "name,shape,expected",
    [("fashion_mnist_cnn", (28, 28, 1), 29_034), ("cifar10_cnn", (32, 32, 3), 551_466)],
)
def test_parameter_counts_match_the_paper(name, shape, expected):
    params, _ = models.init_variables(build(name), jax.random.key(0), shape)
    assert models.count_params(params) == expected


@pytest.mark.slow  # compiles a CIFAR-sized model: 10 s or more on 2 cores
@pytest.mark.parametrize(
    "name,shape", [("fashion_mnist_cnn", (28, 28, 1)), ("cifar10_cnn", (32, 32, 3))]
)
def test_im2col_and_xla_convolutions_agree(name, shape):
    x = jax.random.uniform(jax.random.key(1), (3, *shape))
    fast, ref = (
        build(name, conv_impl="im2col"),
        build(name, conv_impl="xla"),
    )
    params, stats = models.init_variables(fast, jax.random.key(0), shape)
    variables = {"params": params, "batch_stats": stats}
    out_fast = fast.apply(variables, x, train=False)
    out_ref = ref.apply(variables, x, train=False)
    assert out_fast.shape == (3, 10)
    np.testing.assert_allclose(out_fast, out_ref, rtol=1e-4, atol=1e-4)
    grad = lambda m: jax.grad(lambda p: m.apply({"params": p, "batch_stats": stats}, x).sum())(
        params
    )
    for a, b in zip(jax.tree.leaves(grad(fast)), jax.tree.leaves(grad(ref))):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)


def test_head_kernel_has_one_column_per_class():
    params, _ = models.init_variables(build("fashion_mnist_cnn"), jax.random.key(0), (28, 28, 1))
    assert params[models.HEAD]["kernel"].shape == (7 * 7 * 32, 10)
    params, _ = models.init_variables(build("cifar10_cnn", 100), jax.random.key(0), (32, 32, 3))
    assert params[models.HEAD]["kernel"].shape == (128, 100)  # CIFAR-100: 100 classes


@pytest.mark.slow  # compiles a CIFAR-sized model: 10 s or more on 2 cores
def test_original_cifar_softmax_output_is_optional():
    model = build("cifar10_cnn", softmax_output=True)
    params, stats = models.init_variables(model, jax.random.key(0), (32, 32, 3))
    out = model.apply({"params": params, "batch_stats": stats}, jnp.ones((2, 32, 32, 3)))
    np.testing.assert_allclose(out.sum(-1), 1.0, rtol=1e-5)


@pytest.mark.slow  # compiles a CIFAR-sized model: 10 s or more on 2 cores
def test_batch_norm_mask_ignores_padding_examples():
    model = build("fashion_mnist_cnn")
    params, stats = models.init_variables(model, jax.random.key(0), (28, 28, 1))
    x = jax.random.uniform(jax.random.key(2), (4, 28, 28, 1))
    junk = x.at[2:].set(1e3)
    run = lambda inp, mask: model.apply(
        {"params": params, "batch_stats": stats},
        inp,
        train=True,
        mask=mask,
        mutable=["batch_stats"],
    )[1]["batch_stats"]
    mask = jnp.array([True, True, False, False])
    a, b = run(x, mask), run(junk, mask)
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(u, v, rtol=1e-5)


def test_config_blocks_list_each_models_own_fields():
    assert models.config_block("fashion_mnist_cnn") == {
        "name": "fashion_mnist_cnn",
        "conv_impl": "auto",
    }
    assert models.config_block("cifar10_cnn")["softmax_output"] is False
