"""The round: one jitted, pure function from server state to server state.

    select -> gather on device -> attack's data seam (masked) -> vmapped local training
    -> stacked updates [k, d] -> attack's update seam (masked) -> server guard (non-finite
    rows out) -> defense (client weights) -> the defense's aggregate

Everything about a client is an index into stacked arrays; nothing is a Python object.
Sign convention: an update is `delta = local - global`, what the server adds.
A run's attacks and defenses are sets; each experiment's scenario picks one of each by a
traced index, so a sweep over attacks and defenses is still one compiled program.
A run advances a group of experiments at once: states and scenarios carry a leading
experiment axis [E], the client data is shared. The experiments of a group share their
attack and defense (config.plan groups them so), and the group's index is one value for
all of them: `lax.switch` then runs the chosen branch only. An index that differed per
experiment would be batched by the experiment axis, and a batched switch computes every
branch for every experiment.
"""

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import flax
import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from fedjax_poison import attacks, defenses
from fedjax_poison.round import client, selection, server

PyTree = Any


@flax.struct.dataclass
class ServerState:
    """The global model and everything the server remembers, for one experiment."""

    params: PyTree
    batch_stats: PyTree
    round: jax.Array  # [] int32, rounds completed
    defense_state: PyTree
    blocked: jax.Array  # [N] bool, excluded from selection by the defense
    participations: jax.Array  # [N] int32, rounds each client has trained in
    last_update: jax.Array  # [d] float32, the last round's change of the global model
    attack_state: PyTree = ()  # what the run's attacks remember (attacks.select), e.g. a trigger


@flax.struct.dataclass
class Scenario:
    """One experiment's ground truth and schedule; a sweep stacks these on a leading [E] axis."""

    seed: jax.Array  # [] int32: selections, batch orders and augmentation derive from it
    malicious: jax.Array  # [N] bool
    flip: jax.Array  # [C] int32, the label each class becomes on a poisoning client
    schedule: jax.Array  # [] int32, index into selection.SCHEDULES
    breakpoint: jax.Array  # [] int32
    alpha: jax.Array  # [2] float32, availability before / from the breakpoint
    poison_window: jax.Array  # [3] int32: first round, end round (exclusive), every n-th
    attack: jax.Array  # [] int32, index into the run's attack set
    defense: jax.Array  # [] int32, index into the run's defense set


class ClientData(NamedTuple):
    """Every client's examples on device, stored once: client i holds the `count[i]` examples
    from `start[i]`. x [M, H, W, C] uint8, y [M] int32, start [N] int32, count [N] int32."""

    x: jax.Array
    y: jax.Array
    start: jax.Array
    count: jax.Array


def client_examples(data: ClientData, clients: jax.Array, width: int):
    """(x [k, width, H, W, C], y [k, width], count [k]) of `clients` [k]: each client's
    examples, then zeros up to `width` (at least the largest client's count)."""
    start, count = data.start[clients], data.count[clients]
    position = jnp.arange(width)[None, :]  # [1, width]
    index = start[:, None] + jnp.minimum(position, jnp.maximum(count[:, None] - 1, 0))
    real = position < count[:, None]  # [k, width]
    x = jnp.where(real[..., None, None, None], data.x[index], 0).astype(data.x.dtype)
    return x, jnp.where(real, data.y[index], 0), count


class RoundRecord(NamedTuple):
    """What one round did, for reports and detection metrics (all [k] unless noted)."""

    selected: jax.Array  # int32 client ids
    malicious: jax.Array  # bool, ground truth of the selected clients
    poisoned: jax.Array  # bool, attacked this round (malicious, inside the attack window)
    loss: jax.Array  # float32 local training loss
    weights: jax.Array  # float32 share in the aggregate
    flags: jax.Array  # bool, judged malicious by the defense, or sent a non-finite update
    scores: jax.Array  # float32 suspicion scores
    valid: jax.Array  # bool, the update the client sent was finite
    finite: jax.Array  # [] bool: every loss and the new global model are finite (no divergence)
    degenerate: jax.Array  # [] bool: the rule kept nobody, or flagged all clients but one
    # For the offline PCA analysis (settings.record_features), else [k, 0] and zeros: each
    # client's change of the attacked class's output row over its whole update's norm, and
    # that row's cosine with the global row; the same change of the flip's target row; the
    # global model's two rows before the round (so a variant of the PCA rule can be replayed
    # on them). Chosen by the flip table: analysis only, never shown to the defense.
    features: jax.Array  # [k, F] float32
    feature_sign: jax.Array  # [k] float32
    feature_target: jax.Array  # [k, F] float32
    feature_global: jax.Array  # [2, F] float32, the source row and the target row


class RoundSettings(NamedTuple):
    """The static part of a round (one compile per setting)."""

    clients_per_round: int
    lr: float
    lr_decay_factor: float
    lr_decay_every: int
    min_lr: float
    lr_per_participation: bool  # the original code's quirk: the schedule counts a client's rounds
    record_features: bool = False  # fill RoundRecord.features
    client_groups: int = 1  # devices of the clients axis; each trains ceil(k / groups) clients
    max_count: int = 1  # the federation's largest client: the width of a round's buffers
    sort_by_size: bool = False  # train the round's clients longest first (unequal clients)


def init_state(
    init_variables: Callable[[jax.Array], tuple[PyTree, PyTree]],
    defense: defenses.Defense,  # the run's defense set, as one (defenses.select)
    seed: int,
    num_clients: int,
    attack: attacks.Attack | None = None,  # the run's attack set, as one (attacks.select)
) -> ServerState:
    """The server state of one experiment before round 0."""
    params, batch_stats = init_variables(jax.random.fold_in(jax.random.key(seed), 0x1A17))
    return ServerState(
        params=params,
        batch_stats=batch_stats,
        round=jnp.zeros((), jnp.int32),
        defense_state=defense.init(),
        blocked=jnp.zeros(num_clients, bool),
        participations=jnp.zeros(num_clients, jnp.int32),
        last_update=jnp.zeros_like(ravel_pytree(params)[0]),
        attack_state=attack.init() if attack is not None and attack.init is not None else (),
    )


def make_round_step(
    local_train: Callable[..., client.ClientResult],
    defense_set: Sequence[defenses.Defense],
    attack_set: Sequence[attacks.Attack],
    settings: RoundSettings,
    head: np.ndarray,
    root_data: ClientData | None = None,
    shard_clients: Callable[[PyTree], PyTree] = lambda tree: tree,
    gather_clients: Callable[[PyTree], PyTree] = lambda tree: tree,
    model_loss: Callable[..., jax.Array] | None = None,
    model_features: Callable[..., jax.Array] | None = None,
) -> Callable[[ServerState, Scenario, ClientData], tuple[ServerState, RoundRecord]]:
    """Returns round_step(state, scenario, data) -> (state, record) for one experiment.

    defense_set, attack_set: the run's rules and attacks; scenario.defense and
    scenario.attack pick one of each. head: [F, C] positions of the output kernel in the
    flattened parameters (head_index), from which the defenses' head rows are read.

    With settings.client_groups = G > 1, the k clients train as [G, ceil(k / G)] and
    shard_clients places the leading [G] axis (over a mesh's clients axis): each device
    trains its own clients. Slots beyond k train on nothing (count 0) and are dropped.
    gather_clients then puts the trained clients whole on every device: what follows is
    the server's, computed alike on every device.
    model_loss: client.make_model_loss's (batch_stats, params, x, y) -> loss, for a set of
    attacks that learn (Attack.learn): their context then carries the global model.
    model_features: client.make_model_features's (batch_stats, params, x) -> embeddings,
    offered to the same attacks beside model_loss (None: not offered).
    """
    if model_loss is None and any(a.learn is not None for a in attack_set):
        raise ValueError("an attack of the set learns: make_round_step needs model_loss")
    k, groups = settings.clients_per_round, settings.client_groups
    slots = -(-k // groups) * groups
    in_axes = (None, None, 0, 0, 0, 0, 0)
    train_all = jax.vmap(local_train, in_axes=in_axes)

    def train_in_groups(params, batch_stats, x, y, count, lr, keys) -> client.ClientResult:
        """train_all over [k] clients, as [G, slots / G] with the [G] axis sharded."""
        if groups == 1:
            return train_all(params, batch_stats, x, y, count, lr, keys)
        pad = lambda a: jnp.concatenate([a, a[: slots - k]]) if slots > k else a
        x, y, lr, keys = (pad(a) for a in (x, y, lr, keys))
        count = jnp.concatenate([count, jnp.zeros(slots - k, count.dtype)])  # [slots]
        # Slot j goes to device j mod G: with clients sorted by size, devices share the work.
        split = lambda a: jnp.swapaxes(a.reshape(slots // groups, groups, *a.shape[1:]), 0, 1)
        merge = lambda a: jnp.swapaxes(a, 0, 1).reshape(slots, *a.shape[2:])[:k]
        grouped = shard_clients(tuple(split(a) for a in (x, y, count, lr, keys)))
        trained = jax.vmap(train_all, in_axes=in_axes)(params, batch_stats, *grouped)
        return gather_clients(jax.tree.map(merge, trained))

    def train_round(params, batch_stats, x, y, count, lr, keys) -> client.ClientResult:
        """train_in_groups, longest clients first when sizes differ (groups of similar
        clients stop together); results in the round's order."""
        if not settings.sort_by_size:
            return train_in_groups(params, batch_stats, x, y, count, lr, keys)
        order = jnp.argsort(-count, stable=True)  # [k]
        back = jnp.argsort(order)
        trained = train_in_groups(params, batch_stats, *(a[order] for a in (x, y, count, lr, keys)))
        return jax.tree.map(lambda a: a[back], trained)

    needs_root = any(d.root_size for d in defense_set)

    def round_step(state: ServerState, scenario: Scenario, data: ClientData):
        key = jax.random.fold_in(jax.random.key(scenario.seed), state.round)
        k_select, k_train, k_root = jax.random.split(key, 3)
        # A stream of its own, so that adding attacks leaves selection and training as they were.
        k_data, k_updates = jax.random.split(jax.random.fold_in(key, 0xA77AC4))
        attack = attacks.select(attack_set, scenario.attack)
        defense = defenses.select(defense_set, scenario.defense)
        selected = selection.select_clients(
            k_select,
            state.round,
            scenario.malicious,
            ~state.blocked,
            scenario.schedule,
            scenario.breakpoint,
            scenario.alpha,
            k,
        )  # [k]
        x, y, count = client_examples(data, selected, settings.max_count)  # [k, n, ...]
        malicious = scenario.malicious[selected]
        poisoned = malicious & attacks.poisoning_now(state.round, *scenario.poison_window)
        context = attacks.AttackContext(
            poisoned, selected, state.round, k_data, scenario.flip, state.last_update
        )
        attack_state = state.attack_state
        if attack.learn is not None:  # only attacks that learn pay for the model in the seam
            loss = jax.tree_util.Partial(model_loss, state.batch_stats)
            features = None
            if model_features is not None:
                features = jax.tree_util.Partial(model_features, state.batch_stats)
            context = context._replace(
                state=attack_state, params=state.params, model_loss=loss, model_features=features
            )
            attack_state = attack.learn(x, y, count, context)
            context = context._replace(
                state=attack_state, params=None, model_loss=None, model_features=None
            )
        x, y = attack.poison_data(x, y, count, context)

        if settings.lr_per_participation:
            step = state.participations[selected]  # [k]
        else:
            step = jnp.full((k,), state.round)
        lr = client.lr_at(
            step, settings.lr, settings.lr_decay_factor, settings.lr_decay_every, settings.min_lr
        )
        keys = jax.vmap(lambda c: jax.random.fold_in(k_train, c))(selected)
        trained = train_round(state.params, state.batch_stats, x, y, count, lr, keys)

        flat_global, unravel = ravel_pytree(state.params)
        flat_local = jax.vmap(lambda p: ravel_pytree(p)[0])(trained.params)  # [k, d]
        root = root_update(state, k_root) if needs_root else jnp.zeros_like(flat_global)

        def view_of(sent):
            """(the defense's view of the updates sent [k, d], valid [k])."""
            updates, valid = server.guard(sent)
            view = defenses.RoundView(
                updates=updates,
                head_rows=jnp.swapaxes(updates[:, head], 1, 2),  # [k, C, F], what was sent
                global_head=server.head_kernel_rows(state.params),
                client_ids=selected,
                round=state.round,
                root_update=root,
                valid=valid,
                global_params=flat_global,
            )
            return view, valid

        def aggregate(sent):
            """[d] what the server would add for `sent` [k, d] this round (memory unchanged)."""
            view, valid = view_of(sent)
            return server.server_verdict(defense.apply(view, state.defense_state)[0], valid).delta

        seam = context._replace(key=k_updates, aggregate=jax.tree_util.Partial(aggregate))
        sent = attack.poison_updates(flat_local - flat_global[None], seam)
        view, valid = view_of(sent)
        verdict, defense_state = defense.apply(view, state.defense_state)
        verdict = server.server_verdict(verdict, valid)

        blocked = state.blocked.at[selected].max(verdict.block)
        # A defense may never shrink the pool below one round's worth of clients.
        blocked = jnp.where((~blocked).sum() >= k, blocked, state.blocked)
        flat_params = flat_global + verdict.delta
        batch_stats = server.average_batch_stats(
            state.batch_stats, trained.batch_stats, verdict.weights
        )
        new_state = ServerState(
            params=unravel(flat_params),
            batch_stats=batch_stats,
            round=state.round + 1,
            defense_state=defense_state,
            blocked=blocked,
            participations=state.participations.at[selected].add(1),
            last_update=verdict.delta,
            attack_state=attack_state,
        )
        record = RoundRecord(
            selected,
            malicious,
            poisoned,
            trained.loss,
            verdict.weights,
            verdict.flags,
            verdict.scores,
            valid,
            server.all_finite((trained.loss, flat_params, batch_stats)),
            server.is_degenerate(verdict),
            *attacked_row_features(view, scenario.flip, settings.record_features),
        )
        return new_state, record

    def root_update(state: ServerState, key: jax.Array) -> jax.Array:
        lr = client.lr_at(
            state.round,
            settings.lr,
            settings.lr_decay_factor,
            settings.lr_decay_every,
            settings.min_lr,
        )
        x, y, count = client_examples(root_data, jnp.zeros(1, jnp.int32), root_data.x.shape[0])
        result = local_train(state.params, state.batch_stats, x[0], y[0], count[0], lr, key)
        return ravel_pytree(result.params)[0] - ravel_pytree(state.params)[0]

    return round_step


def attacked_row_features(view: defenses.RoundView, flip: jax.Array, record: bool):
    """(features [k, F], sign [k], target [k, F], global rows [2, F]) of the first flipped
    class (the source) and its target, or empties."""
    k = view.updates.shape[0]
    if not record:
        empty = jnp.zeros((k, 0), jnp.float32)
        return empty, jnp.zeros((k,), jnp.float32), empty, jnp.zeros((2, 0), jnp.float32)
    source = jnp.argmax(flip != jnp.arange(flip.shape[0]))  # 0 when nothing is flipped
    pair = jnp.stack([source, flip[source]])  # the source and its target
    rows = view.head_rows[:, pair]  # [k, 2, F]
    norm = lambda x: jnp.sqrt(jnp.sum(x * x, axis=-1))
    scaled = rows / jnp.maximum(norm(view.updates), 1e-30)[:, None, None]
    global_rows = view.global_head[pair].astype(jnp.float32)  # [2, F]
    row, global_row = rows[:, 0], global_rows[0]
    sign = (row @ global_row) / jnp.maximum(norm(row) * norm(global_row), 1e-30)
    return scaled[:, 0], sign, scaled[:, 1], global_rows


def empty_records(num_rounds: int, k: int, feature_dim: int = 0) -> RoundRecord:
    """Record buffers [num_rounds, k] ([num_rounds] for `finite`, `degenerate`; [num_rounds,
    2, F] for `feature_global`) to fill.

    Zeros, except `valid` and `finite`, which start True so that unused rows never read as
    hostile updates or divergence.
    """
    zeros = lambda dtype: jnp.zeros((num_rounds, k), dtype)
    return RoundRecord(
        zeros(jnp.int32),
        zeros(bool),
        zeros(bool),
        zeros(jnp.float32),
        zeros(jnp.float32),
        zeros(bool),
        zeros(jnp.float32),
        jnp.ones((num_rounds, k), bool),
        jnp.ones((num_rounds,), bool),
        jnp.zeros((num_rounds,), bool),
        jnp.zeros((num_rounds, k, feature_dim), jnp.float32),
        zeros(jnp.float32),
        jnp.zeros((num_rounds, k, feature_dim), jnp.float32),
        jnp.zeros((num_rounds, 2, feature_dim), jnp.float32),
    )


def make_advance(
    round_step: Callable[..., tuple[ServerState, RoundRecord]],
    evaluate: Callable[..., jax.Array],
    max_rounds: int,
    clients_per_round: int,
    spmd_axis_name: str | None = None,
    feature_dim: int = 0,
    experiment_shards: int = 1,
    trigger: Callable[[jax.Array, PyTree, jax.Array], jax.Array] | None = None,
) -> Callable[..., tuple[ServerState, RoundRecord, jax.Array]]:
    """Returns advance(states [E], scenarios [E], data, test, num_rounds) for all experiments.

    Runs `num_rounds` (a traced value <= max_rounds, so every chunk of a run shares one
    compile) rounds of every experiment, then evaluates each on the test set. Every
    experiment runs the attack and the defense of the first (`one_rule`): the experiments
    of a call share them (config.plan.experiment_groups). Returns the
    new states, the records [E, max_rounds, ...] (rows past num_rounds are zeros) and the
    confusion matrices [E, V, C, C]: V = 1, the test set; V = 2 with a backdoor's `trigger`
    (attacks.evaluation_trigger: images, the state's attack_state, the scenario's attack),
    then also the test set with the experiment's trigger, as it stands after the last
    round, stamped on every image.

    The experiments run as [G, E / G], G = experiment_shards: the [G] axis is vmapped onto
    the mesh axis `spmd_axis_name`; a device's E / G experiments are vmapped on an
    accelerator, and run one after the other on CPU, where a step as wide as several
    experiments leaves the cache: a sweep of 4 runs 1.3x faster (benchmarks/README.md).
    """

    def advance_one(state, scenario, data, test, num_rounds):
        def body(i, carry):
            state, records = carry
            state, record = round_step(state, scenario, data)
            records = jax.tree.map(lambda buf, r: buf.at[i].set(r), records, record)
            return state, records

        records = empty_records(max_rounds, clients_per_round, feature_dim)
        state, records = jax.lax.fori_loop(0, num_rounds, body, (state, records))
        x, y, mask = test
        views = [x] if trigger is None else [x, trigger(x, state.attack_state, scenario.attack)]
        confusion = jnp.stack(
            [evaluate(state.params, state.batch_stats, v, y, mask) for v in views]
        )
        return state, records, confusion

    def advance_with(states, scenarios, data, test, num_rounds, rule):
        set_rule = lambda s: s.replace(attack=rule[0], defense=rule[1])
        if jax.default_backend() == "cpu":  # the rule is closed over, never mapped
            one = lambda each: advance_one(each[0], set_rule(each[1]), data, test, num_rounds)
            return jax.lax.map(one, (states, scenarios))
        one = lambda state, scenario: advance_one(state, set_rule(scenario), data, test, num_rounds)
        return jax.vmap(one)(states, scenarios)

    # The rule is not mapped: the same index for every experiment, so never batched.
    advance_groups = jax.vmap(
        advance_with, in_axes=(0, 0, None, None, None, None), spmd_axis_name=spmd_axis_name
    )

    def advance(states, scenarios, data, test, num_rounds):
        g = experiment_shards
        split = lambda a: a.reshape(g, a.shape[0] // g, *a.shape[1:])  # [E, ...] -> [G, E/G, ...]
        merge = lambda a: a.reshape(a.shape[0] * a.shape[1], *a.shape[2:])
        rule = one_rule(scenarios)
        states, scenarios = jax.tree.map(split, (states, scenarios))
        out = advance_groups(states, scenarios, data, test, num_rounds, rule)
        return jax.tree.map(merge, out)

    return advance


def one_rule(scenarios: Scenario) -> tuple[jax.Array, jax.Array]:
    """(attack, defense) [] int32 of the first of scenarios [E]: the rule all of them run."""
    return scenarios.attack[0], scenarios.defense[0]
