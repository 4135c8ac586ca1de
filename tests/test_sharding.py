"""Sharding over host CPU devices (conftest asks XLA for four)."""

import jax
import numpy as np
import pytest

from fedjax_poison.round import sharding


def test_mesh_shapes_and_errors():
    assert sharding.make_mesh(1, 1) is None
    mesh = sharding.make_mesh(2, 2)
    assert dict(mesh.shape) == {"experiments": 2, "clients": 2}
    with pytest.raises(sharding.MeshError, match="needs 64 devices"):
        sharding.make_mesh(8, 8)
    with pytest.raises(sharding.MeshError, match="must be at most clients_per_round"):
        sharding.check_shapes(mesh, 4, 1)
    sharding.check_shapes(mesh, 4, 5)  # 5 clients train as 2 x 3 slots
    with pytest.raises(sharding.MeshError, match="mesh.experiments=2 must divide"):
        sharding.check_shapes(mesh, 3, 4)


def test_experiment_axis_is_split_over_devices():
    mesh = sharding.make_mesh(4, 1)
    x = sharding.by_experiment(mesh, np.arange(8.0).reshape(4, 2))
    assert len({s.device for s in x.addressable_shards}) == 4
    assert all(s.data.shape == (1, 2) for s in x.addressable_shards)
    np.testing.assert_array_equal(jax.device_get(x), np.arange(8.0).reshape(4, 2))


@pytest.mark.parametrize("experiments, clients, k", [(2, 2, 4), (1, 2, 3)])
@pytest.mark.slow  # a whole run
def test_sharded_sweep_equals_one_device(tmp_path, experiments, clients, k):
    # (1, 2, 3): three clients of a round on two devices, as 2 x 2 slots, one of them empty.
    from test_simulation import tiny_config

    from fedjax_poison.runner import train

    def sweep(**mesh):
        c = tiny_config(num_rounds=3, clients_per_round=k)
        c.sweep.seed = (0, 1)
        c.attack.malicious_fraction = 0.25
        c.mesh.update(mesh)
        return train.train_and_evaluate(c, str(tmp_path / "_".join(map(str, mesh.values()))))

    one = sweep(experiments=1, clients=1)["final"]
    many = sweep(experiments=experiments, clients=clients)["final"]
    for a, b in zip(one, many, strict=True):
        assert a["malicious_selected"] == b["malicious_selected"]
        np.testing.assert_allclose(a["recall"], b["recall"], atol=0.02)
        assert abs(a["accuracy"] - b["accuracy"]) < 0.01
