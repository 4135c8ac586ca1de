"""The matrix computes only its own cells: experiments run in groups of one attack and one
defense, each experiment runs its own attack and defense and nothing else, and a cell's
numbers are those of the same attack and defense run alone."""

import collections
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_simulation import tiny_config

from fedjax_poison import attacks, compare_defenses, defenses, testing
from fedjax_poison.config import plan
from fedjax_poison.defenses import robust
from fedjax_poison.runner import train


def test_groups_follow_the_cells_in_order_and_pad_each_to_one_size():
    cells = ["a", "b", "a", "b", "a", "c"]  # a: 0, 2, 4; b: 1, 3; c: 5
    assert plan.experiment_groups(6, 0, cells=cells) == [[0, 2, 4], [1, 3, 3], [5, 5, 5]]
    assert plan.experiment_groups(6, 2, cells=cells) == [[0, 2], [4, 4], [1, 3], [5, 5]]
    assert plan.experiment_groups(6, 0, 2, cells=cells) == [
        [0, 2, 4, 4],
        [1, 3, 3, 3],
        [5, 5, 5, 5],
    ]
    assert plan.experiment_groups(3, 0, cells=["a"] * 3) == [[0, 1, 2]]  # one cell: as before
    assert plan.experiment_groups(1, 0, cells=["a"]) == [[0]]


def test_uneven_cells_are_padded_to_the_smallest_size_that_keeps_their_group_count():
    # A clean cell of 3 seeds beside an attacked one of 9 (3 fractions x 3 seeds), at most
    # 8 at once: 3 groups of 5 slots (15 computed for 12 experiments), not 3 of 8 (24).
    groups = plan.experiment_groups(12, 8, cells=["none"] * 3 + ["flip"] * 9)
    assert groups == [[0, 1, 2, 2, 2], [3, 4, 5, 6, 7], [8, 9, 10, 11, 11]]
    # Where the largest cell fills max_parallel, the groups are those of a plain split.
    assert plan.experiment_groups(17, 8, cells=["a"] * 8 + ["b"] * 9) == [
        list(range(8)),
        list(range(8, 16)),
        [16] * 8,
    ]
    for sizes, cap, multiple in [((3, 9), 8, 1), ((1, 7, 2), 3, 2), ((10,), 4, 1), ((5, 5), 0, 2)]:
        cells = [c for c, n in enumerate(sizes) for _ in range(n)]
        groups = plan.experiment_groups(len(cells), cap, multiple, cells=cells)
        assert sorted({e for g in groups for e in g}) == list(range(len(cells)))
        assert len({len(g) for g in groups}) == 1 and len(groups[0]) % multiple == 0
        assert all(len({cells[e] for e in g}) == 1 for g in groups)
        widest = -(-min(cap or max(sizes), max(sizes)) // multiple) * multiple  # the old size
        assert len(groups) == sum(-(-n // widest) for n in sizes)  # no more groups than before


def test_a_matrix_plans_one_group_per_cell_of_its_seeds():
    c, _ = compare_defenses.plan(
        tiny_config(), ["label_flip", "sign_flip"], ["fedavg", "median"], [0, 1, 2]
    )
    p = plan.build(c)
    assert len(p.experiments) == 3 * 2 * 3 and len(p.groups) == 3 * 2
    for group in p.groups:
        exps = [p.experiments[e] for e in group]
        assert len({(e.attack, e.defense) for e in exps}) == 1
        assert sorted(e.seed for e in exps) == [0, 1, 2]
    assert sorted(e for g in p.groups for e in g) == list(range(len(p.experiments)))
    c.sweep.max_parallel = 2  # a cell of 3 seeds: 2 groups of 2, the second padded
    groups = plan.build(c).groups
    assert len(groups) == 12 and all(len(g) == 2 for g in groups)
    assert len(plan.members(groups[1])) == 1


def _spied_attack(calls, name, factor):
    """Multiplies the poisoned rows by factor; counts its rounds in calls[name]."""

    def factory():
        def poison_updates(updates, ctx):
            jax.debug.callback(lambda r: calls.update([name]), ctx.round)
            return jnp.where(ctx.poisoned[:, None], factor * updates, updates)

        return attacks.Attack(attacks.clean_data, poison_updates, "untargeted")

    return factory


def _spied_defense(calls, name, rule):
    """The rule; counts its rounds in calls[name]."""

    def factory():
        built = rule()

        def apply(view, memory):
            jax.debug.callback(lambda r: calls.update([name]), view.round)
            return built.apply(view, memory)

        return built._replace(apply=apply)

    return factory


def config():
    """A 2-round tiny run with a small MLP (quick to compile)."""
    c = tiny_config(num_rounds=2, eval_every=2, **{"model.name": "mlp"})
    c.model.mlp.hidden = (16,)
    c.attack.malicious_fraction = 0.25
    return c


@pytest.fixture(scope="module")
def spied(tmp_path_factory):
    """(workdir, calls, calls of the alone run) of a matrix of 2 counting attacks (+ none) x
    2 counting defenses x seeds 0, 1, and of its cell (spy_scale, spy_median) seed 1 alone."""
    calls = collections.Counter()
    with testing.registrations_undone():
        attacks.register("spy_flip", _spied_attack(calls, "spy_flip", -1.0))
        attacks.register("spy_scale", _spied_attack(calls, "spy_scale", 3.0))
        defenses.register("spy_fedavg", _spied_defense(calls, "spy_fedavg", robust.fedavg))
        defenses.register("spy_median", _spied_defense(calls, "spy_median", robust.median))
        workdir = tmp_path_factory.mktemp("spied")
        attack_names, defense_names = ["spy_flip", "spy_scale"], ["spy_fedavg", "spy_median"]
        compare_defenses.compare(config(), str(workdir), attack_names, defense_names, [0, 1])
        jax.effects_barrier()
        in_matrix = dict(calls)
        calls.clear()
        alone = config()
        alone.attack.name, alone.defense.name, alone.seed = "spy_scale", "spy_median", 1
        train.train_and_evaluate(alone, str(workdir / "alone"))
        jax.effects_barrier()
        yield workdir, in_matrix, dict(calls)


@pytest.mark.slow  # a matrix and a run: two compiles
def test_each_experiment_runs_its_own_attack_and_defense_only(spied):
    _, calls, alone = spied
    # 2 rounds x 2 seeds x the cells using it; computing the run's whole set would count
    # 2 x 12 experiments for each.
    assert calls == {"spy_flip": 8, "spy_scale": 8, "spy_fedavg": 12, "spy_median": 12}
    assert alone == {"spy_scale": 2, "spy_median": 2}


def _metrics(folder, **which):
    rows = [json.loads(line) for line in open(folder / "metrics.jsonl")]
    return [r for r in rows if all(r[k] == v for k, v in which.items())]


@pytest.mark.slow  # a matrix and a run: two compiles
def test_a_cell_has_the_numbers_of_its_attack_and_defense_run_alone(spied):
    workdir, _, _ = spied
    (cell,) = _metrics(workdir / "run", attack="spy_scale", defense="spy_median", seed=1)
    (alone,) = _metrics(workdir / "alone")
    assert cell["malicious_selected"] == alone["malicious_selected"]
    for key in ("accuracy", "loss", "attack_success_rate", "accuracy_drop"):
        if isinstance(alone.get(key), float):
            assert cell[key] == pytest.approx(alone[key], abs=1e-5), key
    np.testing.assert_allclose(cell["recall"], alone["recall"], atol=1e-5)
