"""Data attacks by hand: label flips, BadNets and DBA triggers, the adaptive flip."""

import jax
import jax.numpy as jnp
import numpy as np
from test_attacks import make, round_inputs

from fedjax_poison import attacks
from fedjax_poison.attacks.backdoor import split_trigger, trigger_pixels


def test_flip_table_is_identity_except_sources():
    table = attacks.flip_table(((6, 0), (1, 3)), 10)
    assert table.tolist() == [0, 3, 2, 3, 4, 5, 0, 7, 8, 9]


def test_poison_labels_flips_only_poisoned_clients_and_only_sources():
    y = jnp.array([[6, 1, 2], [6, 6, 0]])
    table = jnp.asarray(attacks.flip_table(((6, 0),), 10))
    out = attacks.poison_labels(y, table, jnp.array([True, False]))
    assert out.tolist() == [[0, 1, 2], [6, 6, 0]]


def test_mappings_by_hand():
    assert attacks.mapping_pairs("pairs", ((6, 0),), 0, 10) == ((6, 0),)
    assert attacks.mapping_pairs("all_to_one", (), 2, 4) == ((0, 2), (1, 2), (3, 2))
    assert attacks.mapping_pairs("all_to_all", (), 0, 4) == ((0, 3), (1, 2), (2, 1), (3, 0))
    assert attacks.mapping_pairs("all_to_all", (), 0, 3) == ((0, 2), (2, 0))  # 1 stays
    assert attacks.mapping_pairs("random", ((6, 0),), 0, 10) == ()


def test_label_flip_uses_the_experiments_table():
    x, y, count, _, ctx = round_inputs()
    _, flipped = make("label_flip").poison_data(x, y, count, ctx)  # the table flips 2 -> 0
    want = np.where(np.asarray(ctx.poisoned)[:, None] & (np.asarray(y) == 2), 0, np.asarray(y))
    np.testing.assert_array_equal(flipped, want)


def test_random_labels_are_uniform_and_only_on_poisoned_rows():
    attack = make("label_flip", **{"label_flip.mapping": "random"})
    assert attack.measure == "untargeted"
    y = jnp.zeros((2, 4000), jnp.int32)
    ctx = round_inputs()[4]._replace(poisoned=jnp.asarray([True, False]))
    _, new = attack.poison_data(None, y, None, ctx)
    shares = np.bincount(np.asarray(new[0]), minlength=4) / 4000
    np.testing.assert_allclose(shares, 0.25, atol=0.03)  # 4 classes, 1000 each expected
    assert (np.asarray(new[1]) == 0).all()


def test_trigger_is_a_square_one_pixel_from_the_corner():
    mask, value = trigger_pixels("square", 2, (6, 6, 1))
    assert np.argwhere(mask).tolist() == [[3, 3], [3, 4], [4, 3], [4, 4]]
    assert (value[mask] == 255).all()
    _, checker = trigger_pixels("checkerboard", 2, (6, 6, 1))
    assert checker[mask].tolist() == [255, 0, 0, 255]


def test_dba_parts_are_strips_whose_union_is_the_trigger():
    mask, _ = trigger_pixels("square", 4, (8, 8, 1))
    pieces = split_trigger(mask, 2)  # rows 3-4 and rows 5-6 of the square
    assert [np.flatnonzero(p.any(1)).tolist() for p in pieces] == [[3, 4], [5, 6]]
    assert (pieces.sum(0) == mask).all()  # disjoint, and together the whole trigger


def test_backdoor_stamps_exactly_the_share_of_real_examples():
    # count [6, 4, 5], share 0.5: round(3), round(2), round(2.5) = 2 (half to even).
    x, y, count, _, ctx = round_inputs(poisoned=(True, True, True))
    attack = make("backdoor", **{"backdoor.target": 1, "backdoor.size": 2})
    new_x, new_y = attack.poison_data(x, y, count, ctx)
    mask, _ = trigger_pixels("square", 2, (8, 8, 1))
    stamped = (np.asarray(new_x)[..., 0][:, :, mask] == 255).all(-1)  # [k, n]
    changed = (np.asarray(new_x) != np.asarray(x)).any((2, 3, 4))
    assert stamped.sum(1).tolist() == [3, 2, 2]  # pixels are < 200 before: 255 is the stamp
    assert (changed == stamped).all()
    outside = np.asarray(new_x)[..., 0][:, :, ~mask] != np.asarray(x)[..., 0][:, :, ~mask]
    assert not outside.any()  # nothing but the trigger's pixels changes
    assert (np.asarray(new_y)[changed] == 1).all()
    padding = np.arange(6)[None, :] >= np.asarray(count)[:, None]
    assert not changed[padding].any()  # padding is never stamped
    np.testing.assert_array_equal(np.asarray(new_y)[~changed], np.asarray(y)[~changed])


def test_dba_client_stamps_its_strip_and_the_test_trigger_is_whole():
    x = jnp.zeros((2, 4, 8, 8, 1), jnp.uint8)
    y = jnp.zeros((2, 4), jnp.int32)
    ctx = round_inputs(poisoned=(True, True, False))[4]
    ctx = ctx._replace(poisoned=jnp.asarray([True, True]), client_ids=jnp.asarray([4, 7]))
    attack = make("backdoor", **{"backdoor.parts": 2, "backdoor.share": 1.0})
    new_x, _ = attack.poison_data(x, y, jnp.asarray([4, 4]), ctx)
    rows = lambda img: np.flatnonzero(np.asarray(img)[..., 0].any(1)).tolist()
    assert rows(new_x[0, 0]) == [3, 4] and rows(new_x[1, 0]) == [5, 6]  # ids 4, 7 mod 2
    assert rows(attack.trigger(x[0, 0])) == [3, 4, 5, 6]


def test_adaptive_flip_swaps_the_source_row_for_the_honest_mean():
    # Source class 2 (the table flips 2 -> 0): its head row sits at HEAD[:, 2] = [2, 6].
    updates = jnp.arange(30, dtype=jnp.float32).reshape(3, 10)
    ctx = round_inputs(poisoned=(True, False, False))[4]
    sent = np.asarray(make("adaptive_flip").poison_updates(updates, ctx))
    honest_mean = (np.asarray(updates[1]) + np.asarray(updates[2])) / 2
    np.testing.assert_allclose(sent[0, [2, 6]], honest_mean[[2, 6]])
    others = [i for i in range(10) if i not in (2, 6)]
    np.testing.assert_array_equal(sent[0, others], np.asarray(updates[0, others]))
    half = make("adaptive_flip", **{"adaptive_flip.row_blend": 0.5}).poison_updates(updates, ctx)
    np.testing.assert_allclose(half[0, 2], (2.0 + 17.0) / 2)  # own 2, honest mean 17


def test_adaptive_flip_flips_the_chosen_share_of_labels():
    y = jnp.full((1, 4000), 2, jnp.int32)
    ctx = round_inputs()[4]._replace(poisoned=jnp.asarray([True]))
    attack = make("adaptive_flip", **{"adaptive_flip.flip_share": 0.25})
    _, new = attack.poison_data(None, y, None, ctx)
    assert abs(float((np.asarray(new) == 0).mean()) - 0.25) < 0.03
    assert set(np.unique(np.asarray(new)).tolist()) == {0, 2}


def test_adaptive_flip_leaves_updates_when_nothing_is_flipped():
    updates = jax.random.normal(jax.random.key(0), (3, 10))
    ctx = round_inputs()[4]._replace(flip=jnp.arange(4, dtype=jnp.int32))
    np.testing.assert_array_equal(make("adaptive_flip").poison_updates(updates, ctx), updates)


def test_blended_backdoor_blends_the_key_into_exactly_the_share():
    """Chen et al.: x' = (1 - alpha) x + alpha k on round(share * count) examples of each
    poisoning client, labelled the target; the test trigger is the same blend."""
    x, y, count, _, ctx = round_inputs(poisoned=(True, False, True))
    attack = make("blended", **{"blended.target": 1, "blended.alpha": 0.2})
    new_x, new_y = attack.poison_data(x, y, count, ctx)
    key = np.random.default_rng(0).integers(0, 256, (8, 8, 1)).astype(np.float64)
    want = np.clip(np.round(0.8 * np.asarray(x, np.float64) + 0.2 * key), 0, 255)
    changed = (np.asarray(new_y) != np.asarray(y)) | (np.asarray(new_x) != np.asarray(x)).any(
        (2, 3, 4)
    )
    blended_rows = (np.asarray(new_x) == want).all((2, 3, 4)) & changed
    assert blended_rows.sum(1).tolist() == [3, 0, 2]  # round(0.5 * [6, 4, 5])
    assert (np.asarray(new_y)[blended_rows] == 1).all()
    np.testing.assert_array_equal(np.asarray(new_x)[~blended_rows], np.asarray(x)[~blended_rows])
    np.testing.assert_array_equal(np.asarray(attack.trigger(x[0, 0])), want[0, 0])
