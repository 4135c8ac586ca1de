import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_poison import attacks


def test_parse_flips():
    assert attacks.parse_flips("6:0") == ((6, 0),)
    assert attacks.parse_flips("6:0, 1:3") == ((6, 0), (1, 3))
    assert attacks.parse_flips("") == ()
    with pytest.raises(ValueError, match="attack.flips"):
        attacks.parse_flips("6-0")


def test_flip_table_is_identity_except_sources():
    table = attacks.flip_table(((6, 0), (1, 3)), 10)
    assert table.tolist() == [0, 3, 2, 3, 4, 5, 0, 7, 8, 9]


def test_poison_labels_flips_only_poisoned_clients_and_only_sources():
    y = jnp.array([[6, 1, 2], [6, 6, 0]])
    table = jnp.asarray(attacks.flip_table(((6, 0),), 10))
    out = attacks.poison_labels(y, table, jnp.array([True, False]))
    assert out.tolist() == [[0, 1, 2], [6, 6, 0]]


def test_draw_malicious_is_seeded_and_sized():
    a = attacks.draw_malicious(3, 50, 0.3)
    assert a.sum() == 15
    assert (a == attacks.draw_malicious(3, 50, 0.3)).all()
    assert (a != attacks.draw_malicious(4, 50, 0.3)).any()
    assert attacks.draw_malicious(0, 50, 0.0).sum() == 0
    assert attacks.draw_malicious(0, 50, 1.0).all()


def test_larger_fraction_keeps_the_smaller_ones_malicious():
    # The same seed draws nested sets, so a sweep over fractions adds attackers.
    small, large = attacks.draw_malicious(1, 50, 0.1), attacks.draw_malicious(1, 50, 0.4)
    assert (large[small]).all()


def test_poisoning_window():
    rounds = jnp.arange(12)
    on = attacks.poisoning_now(rounds, jnp.int32(2), jnp.int32(10), jnp.int32(3))
    assert np.flatnonzero(np.asarray(on)).tolist() == [2, 5, 8]
