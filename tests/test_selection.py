import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_poison.round import selection

N, K = 50, 5


def run(schedule, malicious, rounds=400, breakpoint=75, alpha=(0.5, 0.5), eligible=None):
    """Selections [rounds, K] of one schedule."""
    eligible = jnp.ones(N, bool) if eligible is None else eligible
    f = jax.jit(
        jax.vmap(
            lambda r: selection.select_clients(
                jax.random.fold_in(jax.random.key(0), r),
                r,
                malicious,
                eligible,
                jnp.int32(selection.SCHEDULES.index(schedule)),
                jnp.int32(breakpoint),
                jnp.asarray(alpha, jnp.float32),
                K,
            )
        )
    )
    return np.asarray(f(jnp.arange(rounds)))


def malicious_mask(n_bad):
    return jnp.arange(N) < n_bad


def test_random_selection_is_distinct_and_uniform():
    sel = run("always", malicious_mask(10), rounds=2000)
    assert all(len(set(row)) == K for row in sel)
    counts = np.bincount(sel.ravel(), minlength=N)
    expected = 2000 * K / N  # 200
    assert counts.min() > 0.7 * expected and counts.max() < 1.3 * expected
    # 20% malicious: on average one of five per round
    assert abs(np.isin(sel, np.arange(10)).sum(1).mean() - 1.0) < 0.1


def test_early_and_late_keep_malicious_out_of_their_window():
    bad = malicious_mask(15)
    early, late = run("early", bad, breakpoint=75), run("late", bad, breakpoint=75)
    is_bad = lambda s: np.isin(s, np.arange(15)).sum(1)
    assert is_bad(early)[75:].sum() == 0 and is_bad(early)[:75].mean() > 1.0
    assert is_bad(late)[:75].sum() == 0 and is_bad(late)[75:].mean() > 1.0


@pytest.mark.parametrize("alpha", [0.0, 0.2, 0.6, 1.0])
def test_availability_selects_alpha_k_malicious_on_average(alpha):
    sel = run("availability", malicious_mask(25), rounds=1000, alpha=(alpha, alpha))
    per_round = np.isin(sel, np.arange(25)).sum(1)
    assert abs(per_round.mean() - alpha * K) < 0.15
    assert all(len(set(row)) == K for row in sel)


def test_availability_changes_at_the_breakpoint():
    sel = run("availability", malicious_mask(25), rounds=400, breakpoint=200, alpha=(0.0, 0.8))
    per_round = np.isin(sel, np.arange(25)).sum(1)
    assert per_round[:200].sum() == 0
    assert abs(per_round[200:].mean() - 4.0) < 0.2


def test_blocked_clients_are_never_selected():
    eligible = jnp.arange(N) >= 20
    sel = run("always", malicious_mask(10), rounds=300, eligible=eligible)
    assert sel.min() >= 20


def test_same_key_same_selection():
    a = run("always", malicious_mask(10), rounds=5)
    b = run("always", malicious_mask(10), rounds=5)
    assert (a == b).all()


def test_random_selection_does_not_depend_on_who_is_malicious():
    # Clean and attacked runs with one seed see the same clients.
    assert (
        run("always", malicious_mask(0), rounds=20) == run("always", malicious_mask(25), rounds=20)
    ).all()
