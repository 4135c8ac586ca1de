"""The contracts every member of a registry passes, as functions a user's tests call.

    fedjax_poison.register_defense("my_rule", my_rule)
    fedjax_poison.testing.check_defense("my_rule")        # raises AssertionError if broken

The package's own tests run the same checks over every built-in member
(tests/test_contracts.py), so a user's member is held to what the built-in ones are.
Shapes: [k] clients of a round, [d] parameters, [C] classes, [F] output-layer features.
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_poison import attacks, data, defenses, models
from fedjax_poison.data import partition
from fedjax_poison.round import server

K, D, C, F = 10, 50, 3, 4  # the defense checks' round: clients, parameters, classes, features
LAYERS = (C * F, 3, 30, 5)  # the sizes of its D parameters' arrays: a head, then three more


@contextlib.contextmanager
def registrations_undone():
    """Every registration made inside the block (attacks, defenses, models, datasets,
    partitions) is undone when it ends: tests that register stay independent."""
    registries = (
        attacks.ATTACKS,
        defenses.DEFENSES,
        defenses.PRE_AGGREGATORS,
        models.MODELS,
        partition.PARTITIONS,
    )
    saved = [dict(r._members) for r in registries], dict(data.SPECS)  # noqa: SLF001
    try:
        yield
    finally:
        for registry, members in zip(registries, saved[0]):
            registry._members.clear()  # noqa: SLF001
            registry._members.update(members)  # noqa: SLF001
        data.SPECS.clear()
        data.SPECS.update(saved[1])


# --- defenses -------------------------------------------------------------------------


def make_view(
    updates, head_rows=None, *, ids=None, round_=20, root=None, global_head=None, global_params=None
):
    """A round [k, d] as the server builds it: non-finite rows zeroed and marked invalid;
    head rows [k, C, F] read from the first C*F coordinates unless given; global params
    [d] zero unless given."""
    updates, valid = server.guard(jnp.asarray(updates, jnp.float32))
    k, d = updates.shape
    if head_rows is None and d >= C * F:
        head_rows = updates[:, : C * F].reshape(k, C, F)
    elif head_rows is None:
        head_rows = jnp.zeros((k, C, F))
    head_rows = jnp.asarray(head_rows, jnp.float32)
    return defenses.RoundView(
        updates=updates,
        head_rows=head_rows,
        global_head=jnp.ones(head_rows.shape[1:]) if global_head is None else global_head,
        client_ids=jnp.arange(k, dtype=jnp.int32) if ids is None else jnp.asarray(ids, jnp.int32),
        round=jnp.int32(round_),
        root_update=jnp.zeros(d) if root is None else jnp.asarray(root, jnp.float32),
        valid=valid,
        global_params=jnp.zeros(d) if global_params is None else jnp.asarray(global_params),
    )


def random_view(seed: int, rows=None, root=None):
    """A round of random rows [K, D] (or `rows`), client ids, root update and global params
    from `seed`."""
    rng = np.random.default_rng(seed + 1000)
    rows = np.random.default_rng(seed).normal(size=(K, D)) if rows is None else rows
    return make_view(
        rows,
        ids=rng.permutation(20)[: rows.shape[0]],
        root=rng.normal(size=D) if root is None else root,
        global_head=jnp.asarray(rng.normal(size=(C, F)), jnp.float32),
        global_params=rng.normal(size=rows.shape[1]),
    )


# Rows of hostile_rows that arrive invalid (their norm is not finite).
INVALID_ROW = {"nan": 2, "+inf": 7, "-inf": 0, "1e20": 9}


def hostile_rows(base: np.ndarray) -> dict[str, np.ndarray]:
    """Rounds [K, D] as clients might send them, made from `base` [K, D]: NaN and inf
    entries, rows of 1e20 (their norm overflows: invalid), 1e18 (finite norm, squares
    overflow), 1e-30, duplicated, all equal, one large outlier."""
    cases = {}
    for label, row, value in [("nan", 2, np.nan), ("+inf", 7, np.inf), ("-inf", 0, -np.inf)]:
        cases[label] = base.copy()
        cases[label][row, 5] = value
    cases["1e20"] = base.copy()
    cases["1e20"][9] = 1e20
    cases["1e18"] = base.copy()
    cases["1e18"][4] = 1e18
    cases["1e18 pair"] = cases["1e18"].copy()
    cases["1e18 pair"][7] = -1e18
    cases["tiny"] = base.copy()
    cases["tiny"][:3] *= 1e-30
    cases["duplicated"] = base.copy()
    cases["duplicated"][[1, 5]] = base[0]
    cases["all equal"] = np.tile(base[:1], (K, 1))
    cases["-1e6"] = base.copy()
    cases["-1e6"][6] = -1e6
    cases["outlier"] = base.copy()
    cases["outlier"][3] *= 100.0
    cases["random"] = base
    return cases


def permuted(view, perm):
    """The same round with its clients in the order `perm`."""
    return view._replace(
        updates=view.updates[perm],
        head_rows=view.head_rows[perm],
        client_ids=view.client_ids[perm],
        valid=view.valid[perm],
    )


def check_verdict(name: str, verdict, view, defense) -> None:
    """What every verdict promises: a finite aggregate [d]; weights [k] >= 0 summing to 1
    (or all 0), none on invalid rows; flags only on valid rows, only from flagging rules;
    scores [k] never NaN nor -inf."""
    valid = np.asarray(view.valid)
    k, d = view.updates.shape
    assert verdict.delta.shape == (d,) and np.isfinite(verdict.delta).all(), name
    w = np.asarray(verdict.weights)
    assert w.shape == (k,) and w.dtype == np.float32 and (w >= 0).all(), name
    assert (w[~valid] == 0).all(), f"{name}: an invalid row has no weight"
    assert np.isclose(w.sum(), 1.0, rtol=1e-5) or w.sum() == 0, f"{name}: weights sum {w.sum()}"
    assert verdict.flags.shape == (k,) and verdict.flags.dtype == np.bool_, name
    assert not verdict.flags[~valid].any(), f"{name}: the server flags invalid rows, not the rule"
    assert verdict.scores.shape == (k,) and verdict.scores.dtype == np.float32, name
    assert not np.isnan(verdict.scores).any() and not (verdict.scores == -np.inf).any(), name
    assert verdict.block.shape == (k,) and verdict.block.dtype == np.bool_, name
    if not defense.flags_clients:
        assert not verdict.flags.any(), f"{name} says it flags nobody"


def build_defense(name: str, *, k: int = K, d: int = D, num_clients: int = 20, **fields):
    """The rule or chain `name` for a round of k rows of d parameters (in the arrays LAYERS
    when d = D), with `fields` set in its blocks (defenses.block_for)."""
    return defenses.make_defense(
        defenses.block_for(name, **fields),
        num_clients=num_clients,
        clients_per_round=k,
        num_params=d,
        num_classes=C,
        head_features=F,
        layer_sizes=LAYERS if d == D else (),
    )


def check_defense(name: str, *, order_invariant: bool = True, **fields) -> None:
    """A registered rule or chain on hostile rounds of K clients (hostile_rows): every verdict
    keeps its promises, its memory keeps its shapes, and (order_invariant) permuting the
    clients permutes weights and flags and leaves the aggregate as it was."""
    defense = build_defense(name, **fields)
    cases = hostile_rows(np.random.default_rng(0).normal(size=(K, D)))
    root = cases["random"][0]
    views = [random_view(0, rows, root) for rows in cases.values()]
    perms = [np.random.default_rng(i).permutation(K) for i in range(len(views))]
    views += [permuted(v, p) for v, p in zip(views, perms)]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *views)
    memory = defense.init()
    verdicts, memories = jax.device_get(
        jax.jit(jax.vmap(defense.apply, in_axes=(0, None)))(stacked, memory)
    )
    pick = lambda tree, i: jax.tree.map(lambda a: a[i], tree)
    shapes = lambda tree: jax.tree.map(lambda x: (jnp.shape(x), jnp.result_type(x)), tree)
    n = len(cases)
    for i, label in enumerate(cases):
        verdict = pick(verdicts, i)
        check_verdict(f"{name} on {label}", verdict, views[i], defense)
        assert shapes(pick(memories, i)) == shapes(memory), f"{name}: memory changed shape"
        if not order_invariant or label == "1e18 pair":  # +1e18 and -1e18 cancel: any sum
            continue  # of them depends on its order in float32, whatever the rule
        moved, perm = pick(verdicts, n + i), perms[i]
        where = f"{name} on {label}, clients permuted"
        scale = max(1.0, float(np.abs(verdict.delta).max(initial=0.0)))
        np.testing.assert_allclose(
            moved.delta, verdict.delta, rtol=1e-4, atol=1e-5 * scale, err_msg=where
        )
        np.testing.assert_allclose(moved.weights, verdict.weights[perm], atol=1e-6, err_msg=where)
        np.testing.assert_array_equal(moved.flags, verdict.flags[perm], err_msg=where)


# --- attacks --------------------------------------------------------------------------


def attack_round(
    k: int = 3, n: int = 6, num_classes: int = 4, image=(8, 8, 1), seed: int = 0, d: int = 10
):
    """(x [k, n, H, W, C] uint8, y [k, n], count [k], updates [k, d], ctx) of a round in
    which clients 0 and 2 poison, flipping class 2 to 0, after a random global change, under
    a coordinate-wise median."""
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.integers(0, 200, (k, n, *image)), jnp.uint8)
    y = jnp.asarray(rng.integers(0, num_classes, (k, n)), jnp.int32)
    count = jnp.asarray(rng.integers(1, n + 1, k), jnp.int32)
    updates = jnp.asarray(rng.normal(size=(k, d)), jnp.float32)
    ctx = attacks.AttackContext(
        poisoned=jnp.asarray(np.arange(k) % 2 == 0),
        client_ids=jnp.arange(k, dtype=jnp.int32) * 3 + 1,
        round=jnp.int32(3),
        key=jax.random.key(seed),
        flip=jnp.asarray(attacks.flip_table(((2, 0),), num_classes)),
        global_update=jnp.asarray(rng.normal(size=d), jnp.float32),
        aggregate=jax.tree_util.Partial(median_rule),
    )
    return x, y, count, updates, ctx


def median_rule(updates: jax.Array) -> jax.Array:
    """[d] the coordinate-wise median of updates [k, d]: a server's rule for attack rounds."""
    return jnp.median(updates, axis=0)


def check_attack(name: str, block: dict | None = None, *, num_classes: int = 4) -> None:
    """A registered attack (or chain 'a+b') on a round of 3 clients, 2 of them poisoning:
    shapes and dtypes kept; honest rows bit-identical; nobody poisoning changes nothing; the
    same under jit; its measure one of attacks.MEASURES; an attack that learns, also
    check_learning (the round's d is then the parameter count of its linear model)."""
    cfg = attacks.default_config("2:0")
    for part, values in (block or {}).items():
        cfg[part].update(values)
    image = (8, 8, 1)
    head = np.arange(2 * num_classes, dtype=np.int32).reshape(2, num_classes)  # [F=2, C]
    d = linear_size(image, num_classes)
    attack = attacks.make_attack(
        name,
        cfg,
        num_classes=num_classes,
        image_shape=image,
        clients_per_round=3,
        head_index=head,
        num_params=d,
    )
    assert attack.measure in attacks.MEASURES, f"{name}: measure {attack.measure!r}"
    x, y, count, updates, ctx = attack_round(num_classes=num_classes, image=image, d=d)

    def apply(x, y, count, updates, ctx):
        return (*attack.poison_data(x, y, count, ctx), attack.poison_updates(updates, ctx))

    out = apply(x, y, count, updates, ctx)
    honest = np.flatnonzero(~np.asarray(ctx.poisoned))
    for got, given in zip(out, (x, y, updates)):
        assert got.shape == given.shape and got.dtype == given.dtype, f"{name}: shape or dtype"
        np.testing.assert_array_equal(
            np.asarray(got)[honest],
            np.asarray(given)[honest],
            err_msg=f"{name} changed an honest client's row",
        )
    nobody = ctx._replace(poisoned=jnp.zeros_like(ctx.poisoned))
    for got, given in zip(apply(x, y, count, updates, nobody), (x, y, updates)):
        np.testing.assert_array_equal(
            np.asarray(got), np.asarray(given), err_msg=f"{name} changed a round nobody poisons"
        )
    jitted = jax.jit(apply)(x, y, count, updates, ctx)
    for got, eager in zip(jitted, out):
        np.testing.assert_allclose(
            np.asarray(got),
            np.asarray(eager),
            rtol=1e-6,
            atol=1e-6,
            err_msg=f"{name}: jit and eager differ",
        )
    if attack.learn is not None:
        check_learning(name, attack, x, y, count, ctx, num_classes)


def linear_size(image, num_classes: int) -> int:
    """d of the linear model on images of shape `image`: a kernel [P, C] and a bias [C]."""
    return (int(np.prod(image)) + 1) * num_classes


def linear_features(params, x):
    """[b, P] the embedding of the linear model: its output layer's input, the images
    x [b, H, W, C] flattened (pixels / 255)."""
    del params
    return x.reshape(x.shape[0], -1) / 255.0


def linear_loss(params, x, y):
    """[] mean cross-entropy of the linear model params {'head': {'kernel': [P, C], 'bias':
    [C]}} (an output layer alone, laid out as the models' `head`) on images x [b, H, W, C]
    (pixels / 255): a global model for attacks that learn."""
    head = params[models.HEAD]
    logits = linear_features(params, x) @ head["kernel"] + head["bias"][None, :]
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1))


def check_learning(name: str, attack, x, y, count, ctx, num_classes: int) -> None:
    """An attack that learns, under a random linear global model: its state keeps its
    structure, shapes and dtypes and stays finite; a round nobody poisons leaves it as it
    was; the data seam with the learned state leaves honest rows bit-identical."""
    pixels = int(np.prod(x.shape[2:]))
    rng = np.random.default_rng(1)
    params = {
        models.HEAD: {
            "kernel": jnp.asarray(rng.normal(size=(pixels, num_classes)), jnp.float32),
            "bias": jnp.zeros(num_classes, jnp.float32),
        }
    }
    before = attack.init()
    ctx = ctx._replace(
        state=before,
        params=params,
        model_loss=jax.tree_util.Partial(linear_loss),
        model_features=jax.tree_util.Partial(linear_features),
    )
    learned = jax.jit(attack.learn)(x, y, count, ctx)
    shapes = lambda tree: jax.tree.map(lambda a: (a.shape, a.dtype), tree)
    assert shapes(learned) == shapes(before), f"{name}: learn changed the state's shapes"
    finite = all(np.isfinite(np.asarray(a)).all() for a in jax.tree.leaves(learned))
    assert finite, f"{name}: learned a non-finite state"
    nobody = ctx._replace(poisoned=jnp.zeros_like(ctx.poisoned))
    for got, want in zip(
        jax.tree.leaves(attack.learn(x, y, count, nobody)), jax.tree.leaves(before)
    ):
        np.testing.assert_array_equal(
            np.asarray(got), np.asarray(want), err_msg=f"{name} learned in a round nobody poisons"
        )
    honest = np.flatnonzero(~np.asarray(ctx.poisoned))
    out = attack.poison_data(x, y, count, ctx._replace(state=learned))
    for got, given in zip(out, (x, y)):
        assert got.shape == given.shape and got.dtype == given.dtype, f"{name}: shape or dtype"
        np.testing.assert_array_equal(
            np.asarray(got)[honest],
            np.asarray(given)[honest],
            err_msg=f"{name} changed an honest client's row with a learned state",
        )


# --- models ---------------------------------------------------------------------------


def check_model(name: str, image_shape=(28, 28, 1), num_classes: int = 10, **block) -> None:
    """A registered model on a batch of 3 images: logits [3, C]; an output layer `head` with
    kernel [F, C]; a training step with a mask gives finite gradients, and the masked-out
    example changes neither the loss nor any BatchNorm statistic."""
    model = models.make_model({**models.config_block(name), **block}, num_classes)
    params, stats = models.init_variables(model, jax.random.key(0), tuple(image_shape))
    kernel = params.get(models.HEAD, {}).get("kernel")
    assert kernel is not None and kernel.shape[-1] == num_classes, (
        f"{name}: needs an output layer {models.HEAD!r} with kernel [F, {num_classes}]"
    )
    x = jax.random.uniform(jax.random.key(1), (3, *image_shape))
    logits = jax.jit(model.apply, static_argnames="train")(
        {"params": params, "batch_stats": stats}, x, train=False
    )
    assert logits.shape == (3, num_classes), f"{name}: logits {logits.shape}"
    mask = jnp.asarray([True, True, False])
    labels = jnp.asarray([0, 1, 0])

    def loss(params, x):
        out, new = model.apply(
            {"params": params, "batch_stats": stats},
            x,
            train=True,
            mask=mask,
            mutable=["batch_stats"],
        )
        per = -jnp.take_along_axis(jax.nn.log_softmax(out), labels[:, None], 1)[:, 0]
        return jnp.sum(per * mask) / mask.sum(), new.get("batch_stats", {})

    step = jax.jit(jax.value_and_grad(loss, has_aux=True))
    (value, new_stats), grads = step(params, x)
    assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads)), f"{name}: gradients"
    other = x.at[2].set(100.0)  # only the masked-out example differs
    (value2, new_stats2), _ = step(params, other)
    np.testing.assert_allclose(value2, value, rtol=1e-5, err_msg=f"{name}: mask ignored")
    for a, b in zip(jax.tree.leaves(new_stats), jax.tree.leaves(new_stats2)):
        np.testing.assert_allclose(
            a,
            b,
            rtol=1e-4,
            atol=1e-5,
            err_msg=f"{name}: a masked example moved BatchNorm statistics",
        )


# --- datasets and partitions ----------------------------------------------------------


def check_dataset(name: str, source: str = "auto", data_dir: str | None = None) -> None:
    """A registered dataset loads from `source` as uint8 images of its spec's shape with
    labels in [0, C), one class name per class, and normalizes to finite values."""
    spec = data.SPECS[name]
    loaded = data.load_dataset(name, source, data_dir, synthetic_sizes=(50, 20))
    assert len(spec.class_names) == spec.num_classes, f"{name}: class names"
    for x, y in ((loaded.x_train, loaded.y_train), (loaded.x_test, loaded.y_test)):
        assert x.dtype == np.uint8 and x.shape[1:] == tuple(spec.image_shape), f"{name}: images"
        assert y.shape == (len(x),) and 0 <= y.min() and y.max() < spec.num_classes, name
    assert np.isfinite(np.asarray(data.normalize(loaded.x_test[:8], spec))).all(), name


def check_partition(name: str, num_clients: int = 20, num_classes: int = 10, **block) -> None:
    """A registered partition of 2,000 labels: every client holds at least one example,
    indices within the data, the same split for the same seed."""
    labels = np.random.default_rng(0).integers(0, num_classes, 2000)
    sizes = dict(num_clients=num_clients, batch_size=4, num_classes=num_classes)
    first = partition.split(name, block, labels, rng=np.random.default_rng(1), **sizes)
    again = partition.split(name, block, labels, rng=np.random.default_rng(1), **sizes)
    indices, count = first  # ragged: [sum(count)], [N]; split checks sizes and ranges
    assert count.shape == (num_clients,), f"{name}: {count.shape[0]} clients"
    assert indices.shape == (count.sum(),), f"{name}: indices {indices.shape}"
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b, err_msg=f"{name}: not reproducible from its rng")
