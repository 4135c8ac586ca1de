"""What a run builds from its plan before the first round: the data on the device(s), the
model, the run's attacks and defenses, and the compiled program that advances a group."""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_poison import attacks, data, defenses, models
from fedjax_poison.config import experiments
from fedjax_poison.config.plan import Plan
from fedjax_poison.data import partition
from fedjax_poison.round import client, metrics, server, sharding, simulation


class Programs(NamedTuple):
    """Everything the run loop needs, built once."""

    data_source: str  # the source that provided the data: files | tfds | synthetic
    client_data: simulation.ClientData  # every client's examples, stored once, on device
    class_counts: np.ndarray  # [N, C] examples of each class per client
    test: tuple  # (x, y, mask) batched, on device
    advance: Any  # jitted advance(states, scenarios, data, test, num_rounds)
    init_states: Callable  # seeds [G] -> ServerState [G]
    scenarios: simulation.Scenario  # [E], host arrays (placed per group)
    mesh: Any  # jax.sharding.Mesh, or None on one device
    attack_of: list  # [E] attacks.Attack of each experiment (measure, backdoor target)
    flags_clients: list  # [E] bool: the experiment's defense flags clients
    feature_dim: int  # inputs of the output layer (F)
    examples_per_round: int  # examples a round trains on, on average over the clients
    client_sizes: np.ndarray  # [N] examples of each client


def compiler_options() -> dict[str, str]:
    """XLA options for the run's programs on the current backend.

    On CPU, matrix products go to XNNPACK: a round trains 1.15-1.3x faster and evaluates
    about 1.25x faster than with XLA's own dot emitter (benchmarks/README.md).
    """
    if jax.default_backend() != "cpu":
        return {}
    return {"xla_cpu_experimental_xnn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"}


def split_clients(plan: Plan, dataset: data.Dataset) -> partition.ClientData:
    """Partitions the training set among the N clients (host numpy, each example once)."""
    d = plan.data
    indices, count = partition.split(
        d.partition,
        d.partition_block,
        dataset.y_train,
        num_clients=plan.num_clients,
        batch_size=plan.train.batch_size,
        num_classes=plan.spec.num_classes,
        rng=np.random.default_rng(d.partition_seed),
    )
    return partition.make_client_data(dataset.x_train, dataset.y_train, indices, count)


def root_data(plan: Plan, dataset: data.Dataset, size: int) -> simulation.ClientData:
    """The server's small clean root set of `size` examples (FLTrust), as one client."""
    rng = np.random.default_rng([plan.data.partition_seed, 1])
    idx = rng.choice(len(dataset.y_train), size, replace=False)
    return simulation.ClientData(
        jnp.asarray(dataset.x_train[idx]),
        jnp.asarray(dataset.y_train[idx]),
        jnp.zeros(1, jnp.int32),
        jnp.asarray([size], jnp.int32),
    )


def train_settings(plan: Plan, sizes: np.ndarray) -> client.TrainSettings:
    """The plan's local training for clients of these sizes [N]: unequal clients stop after
    their own epochs (with local_steps every client trains the same steps)."""
    unequal = bool(sizes.min() != sizes.max())
    return plan.train._replace(ragged=unequal and not plan.train.local_steps)


def examples_trained(sizes: np.ndarray, settings: client.TrainSettings) -> np.ndarray:
    """[N] examples each client trains on in a round it is selected for."""
    if settings.local_steps:
        return np.full(len(sizes), settings.local_steps * settings.batch_size)
    return sizes * settings.local_epochs


def _rule_sets(plan: Plan, params, feature_dim: int):
    """({name: Defense}, {name: Attack}) of the run's defenses and attacks."""
    exps, spec = list(plan.experiments), plan.spec
    defense_by_name = {
        name: defenses.make_defense(
            {**plan.defense, "name": name},
            num_clients=plan.num_clients,
            clients_per_round=plan.clients_per_round,
            num_params=models.count_params(params),
            num_classes=spec.num_classes,
            head_features=feature_dim,
            layer_sizes=models.layer_sizes(params),
        )
        for name in experiments.defense_set(exps)
    }
    attack_by_name = {
        name: attacks.make_attack(
            name,
            plan.attack,
            num_classes=spec.num_classes,
            image_shape=spec.image_shape,
            clients_per_round=plan.clients_per_round,
            head_index=server.head_index(params),
            num_params=models.count_params(params),
        )
        for name in experiments.attack_set(exps)
    }
    return defense_by_name, attack_by_name


def build(plan: Plan) -> Programs:
    """Loads the data onto the device(s) and builds the run's compiled program."""
    spec, exps = plan.spec, list(plan.experiments)
    d = plan.data
    dataset = data.load_dataset(
        spec.name, d.source, d.dir, synthetic_sizes=d.synthetic_sizes, seed=d.partition_seed
    )
    k = plan.clients_per_round
    mesh_clients = plan.mesh_clients or sharding.auto_clients(plan.mesh_experiments, k)
    mesh = sharding.make_mesh(plan.mesh_experiments, mesh_clients)
    sharding.check_shapes(mesh, len(plan.groups[0]), k)
    host_clients = split_clients(plan, dataset)
    test = metrics.TestSet(dataset.x_test, dataset.y_test, plan.eval_batch_size)

    model = models.make_model(plan.model, spec.num_classes)
    params, _ = models.init_variables(model, jax.random.key(0), spec.image_shape)
    feature_dim = params[models.HEAD]["kernel"].shape[0]  # [F, C]
    defense_by_name, attack_by_name = _rule_sets(plan, params, feature_dim)
    defense_set = list(defense_by_name.values())
    defense = defenses.select(defense_set, 0)
    attack_set = list(attack_by_name.values())
    in_use = sharding.local_devices(mesh)
    sizes = host_clients.count
    train = train_settings(plan, sizes)
    local_train = client.make_local_train(
        model, spec, train, devices_in_use=in_use, clients_at_once=plan.clients_at_once
    )
    lr = plan.lr
    round_step = simulation.make_round_step(
        local_train,
        defense_set,
        attack_set,
        simulation.RoundSettings(
            k,
            lr.lr,
            lr.decay_factor,
            lr.decay_every,
            lr.min_lr,
            lr.per_participation,
            plan.save_features,
            sharding.client_groups(mesh),
            max_count=int(sizes.max()),
            sort_by_size=train.ragged,
        ),
        server.head_index(params),
        root_data(plan, dataset, defense.root_size) if defense.root_size else None,
        sharding.client_constraint(mesh),
        sharding.replicated_constraint(mesh),
        client.make_model_loss(model, spec),
        client.make_model_features(model, spec),
    )
    groups = sharding.client_groups(mesh)
    evaluate = metrics.make_evaluate(
        model, spec, groups, sharding.client_constraint(mesh), devices_in_use=in_use
    )
    advance = jax.jit(
        simulation.make_advance(
            round_step,
            evaluate,
            plan.eval_every,
            k,
            sharding.spmd_axis(mesh),
            feature_dim if plan.save_features else 0,
            experiment_shards=sharding.experiment_shards(mesh),
            trigger=attacks.evaluation_trigger(attack_set),
        ),
        donate_argnums=0,
        compiler_options=compiler_options(),
    )
    init_one = lambda seed: simulation.init_state(
        lambda key: models.init_variables(model, key, spec.image_shape),
        defense,
        seed,
        plan.num_clients,
        attacks.select(attack_set, 0),
    )
    scenarios = experiments.stack(
        [
            experiments.scenario(e, exps, plan.window, plan.num_clients, spec.num_classes)
            for e in exps
        ]
    )
    return Programs(
        data_source=dataset.source,
        client_data=sharding.replicated(mesh, simulation.ClientData(*host_clients)),
        class_counts=partition.class_counts(host_clients, spec.num_classes),
        test=sharding.replicated(mesh, (test.x, test.y, test.mask)),
        advance=advance,
        init_states=jax.jit(jax.vmap(init_one)),
        scenarios=scenarios,
        mesh=mesh,
        attack_of=[attack_by_name[e.attack] for e in exps],
        flags_clients=[defense_by_name[e.defense].flags_clients for e in exps],
        feature_dim=feature_dim,
        examples_per_round=int(np.mean(examples_trained(sizes, train)) * k),
        client_sizes=sizes,
    )
