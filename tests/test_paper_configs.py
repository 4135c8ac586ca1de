"""The paper's config files load for both datasets, validate and expand as documented."""

import importlib

import pytest

from configs import paper
from fedjax_poison import attacks
from fedjax_poison.config import configuration, experiments

DATASETS = ("fashion_mnist", "cifar10")


def load(name, arg):
    return importlib.import_module(f"configs.paper.{name}").get_config(arg)


@pytest.mark.parametrize("dataset", DATASETS)
def test_label_flipping(dataset):
    c = load("label_flipping", f"dataset={dataset}")
    configuration.validate(c)
    exps = experiments.expand(c)
    # 7 attacked fractions x 3 flips x 3 seeds, and one clean run per seed: the clean
    # twins of the three flips are the same experiment, run once.
    assert len(exps) == 7 * 3 * 3 + 3
    assert {e.malicious_fraction for e in exps} == {0, 0.02, 0.04, 0.1, 0.2, 0.3, 0.4, 0.5}
    flips = {attacks.format_flips(e.flips) for e in exps}
    assert flips == set(paper.FLIPS[dataset]) | {""}
    clean = [e for e in exps if e.malicious_fraction == 0]
    assert [(e.attack, e.seed) for e in clean] == [("none", 0), ("none", 1), ("none", 2)]
    assert {e.seed for e in exps} == {0, 1, 2} and {e.schedule for e in exps} == {"always"}
    assert set(exps[0].axes) == {"malicious_fraction", "flips", "seed"}
    assert 0 < c.sweep.max_parallel < len(exps)


@pytest.mark.parametrize("dataset", DATASETS)
def test_attack_timing(dataset):
    c = load("attack_timing", f"dataset={dataset}")
    configuration.validate(c)
    exps = experiments.expand(c)
    assert len(exps) == 3 * 3
    assert [e.schedule for e in exps[:3]] == ["always", "early", "late"]  # seed outermost
    assert {(e.breakpoint, e.malicious_fraction) for e in exps} == {(75, 0.5)}
    assert c.num_rounds == 200 and c.num_rounds % c.eval_every == 0


@pytest.mark.parametrize("dataset", DATASETS)
def test_availability(dataset):
    c = load("availability", f"dataset={dataset}")
    configuration.validate(c)
    exps = experiments.expand(c)
    assert len(exps) == 8 * 3
    assert {e.schedule for e in exps} == {"availability"}
    alphas = [e.alpha for e in exps[:8]]  # seed outermost
    assert alphas[0] == (0.0, 0.0) and alphas[5] == (1.0, 1.0)
    assert alphas[6:] == [(0.0, 0.6), (0.6, 0.0)]


def test_the_default_dataset_is_fashion_mnist():
    assert load("label_flipping", None).dataset == "fashion_mnist"
    assert load("availability", "").dataset == "fashion_mnist"


@pytest.mark.parametrize("arg", ["dataset=mnist", "data=cifar10", "cifar10"])
def test_a_bad_argument_stops(arg):
    with pytest.raises(configuration.ConfigError, match="config argument"):
        load("attack_timing", arg)


def test_fields_stay_overridable():
    c = load("label_flipping", "dataset=fashion_mnist")
    c.sweep.seed, c.sweep.flips = (0,), ("6:0",)
    configuration.validate(c)
    assert len(experiments.expand(c)) == 8  # 7 attacked fractions and the clean run
