"""train_and_evaluate(config, workdir): a run (or a sweep) from its config to its workdir.

    plan = plan.build(config)          the config validated and turned into plain data
    claim the workdir                  locked; a run of this config resumes, another is refused
    programs = setup.build(plan)       the data on the device(s), the compiled round
    for each group of experiments:     chunks of eval_every rounds, each one program call,
        rows, records, checkpoints     written as the run goes (writer.py)
    summary, tables, figures

Ctrl-C stops after the current chunk, saves the run and says how to resume it. A command
line passes its own stop request (fedjax_poison.signals), read at every safe point: after
the set-up, after compiling, after each chunk, between the summary and the report.
"""

import contextlib
import logging
import os
import signal
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_poison import defenses
from fedjax_poison.config import plan as plan_lib
from fedjax_poison.errors import UserError
from fedjax_poison.files import WorkdirError
from fedjax_poison.results import evaluation, report
from fedjax_poison.round import sharding
from fedjax_poison.runner import checkpoint, setup
from fedjax_poison.runner.progress import Progress
from fedjax_poison.runner.workdir import Workdir
from fedjax_poison.runner.writer import RunWriter

log = logging.getLogger("fedjax_poison")
# With checkpoint_every = 0: save after the first evaluation that ends this long after the
# last save, so that a killed run loses at most about this much work.
AUTO_CHECKPOINT_S = 600.0
# Config fields a run may raise between its launches: it goes on from its last checkpoint.
GROWABLE = ("num_rounds",)


class DivergenceError(UserError, RuntimeError):
    """A model went non-finite (NaN or inf); the message names the experiment and round."""


class Interrupted(UserError):
    """The user stopped the run; what it did is saved in `workdir` (None: nothing was)."""

    def __init__(self, message: str, workdir: str | None):
        super().__init__(message)
        self.workdir = workdir


def train_and_evaluate(config, workdir: str, stop: threading.Event | None = None) -> dict | None:
    """Runs every experiment of the config for num_rounds rounds; writes the workdir files.

    The same call with the same workdir resumes from the last checkpoint (see
    checkpoint_every; Ctrl-C also saves one). A finished run only writes its summary and
    report again; one launched again with a larger num_rounds goes on to it. In a multi-host
    run (sharding.initialize_distributed), every process calls it with the same config and a
    workdir on a shared file system; process 0 writes the files and returns the summary, the
    others return None.

    stop: a request (set by a signal) that ends the run with Interrupted at the next safe
    point; without it, Ctrl-C and SIGTERM stop the rounds (in the main thread).
    """
    plan = plan_lib.build(config)
    primary = sharding.is_primary()
    _stop_here(stop, None, "before the run started")
    with Workdir.claim(
        workdir, plan.config, overwrite=plan.overwrite, primary=primary, growable=GROWABLE
    ) as wd:
        sharding.barrier("claim_workdir")
        try:
            _stop_here(stop, wd, "while setting up")
            programs = setup.build(plan)
            _stop_here(stop, wd, "while setting up")
        except UserError:  # refused before anything was written: leave no folder behind
            wd.discard()
            raise
        writer = RunWriter(wd, plan, programs)
        checkpoints = checkpoint.Checkpoints(
            wd.folder(checkpoint.FOLDER),
            plan.num_rounds,
            on_write=lambda step: wd.own(f"{checkpoint.FOLDER}/{step}"),
        )
        try:
            grown = bool(wd.grown)
            saved = _continued(plan, wd, checkpoints.latest())
            writer.start(saved, rewindow=grown)
            compile_s, train_s = _train(plan, programs, writer, checkpoints, saved, stop)
        finally:
            checkpoints.close()
            writer.close()
        summary = None
        _stop_here(stop, wd, "after the last round, before the summary")
        if primary:
            summary = summarize(plan, programs, writer.rows, compile_s, train_s)
            wd.write_json("summary.json", summary)
            _stop_here(stop, wd, "before the report (the rounds are all done)")
            report.write_report(wd.path, writer=wd)
            _warn_degenerate(plan, summary)
            shown = sorted(n for n in os.listdir(wd.path) if not n.startswith("."))
            log.info("results in %s: %s", wd.path, ", ".join(shown))
        # The other processes wait: their exit must not time out jax's shutdown while
        # process 0 still writes.
        sharding.barrier("report_written")
        return summary


def summarize(plan: plan_lib.Plan, programs, rows: list, compile_s: float, train_s: float):
    """summary.json: what ran, how fast, and each experiment's last row."""
    last = {r["experiment"]: r for r in rows}
    final = [last[e] for e in sorted(last)]
    experiment_rounds = plan.num_rounds * len(plan.experiments)
    summary = {
        "num_rounds": plan.num_rounds,
        "num_experiments": len(plan.experiments),
        "data_source": programs.data_source,
        "eval_window": plan.eval_window,
        "compile_s": compile_s,
        "train_and_eval_s": train_s,
        "rounds_per_s": len(plan.groups) * plan.num_rounds / train_s,
        "experiment_rounds_per_s": experiment_rounds / train_s,
        "examples_per_s": experiment_rounds * programs.examples_per_round / train_s,
        "final": final,
        "diverged": [
            {"experiment": r["experiment"], "round": r["diverged_round"]}
            for r in final
            if r.get("diverged")
        ],
        "degenerate_rounds": [r["degenerate_rounds"] for r in final],
    }
    for key in ("detection_precision", "detection_recall"):
        defined = [r[key] for r in final if r.get(key) is not None]
        if defined:  # the mean over the experiments where the rule's measure is defined
            summary[key] = float(np.mean(defined))
    return summary


def _warn_degenerate(plan: plan_lib.Plan, summary: dict) -> None:
    for r in summary["final"]:
        if r["degenerate_rounds"] > max(2, plan.num_rounds // 20):
            log.warning(
                "experiment %d: the defense kept at most one client in %d of %d rounds "
                "(degenerate_rounds in metrics.jsonl): its results say little about the rule",
                r["experiment"],
                r["degenerate_rounds"],
                plan.num_rounds,
            )


def _continued(plan, wd: Workdir, saved: dict | None) -> dict | None:
    """The checkpoint to resume from, once a raised num_rounds is accepted (Workdir.grown).

    The run goes on from its last checkpoint when that ends an evaluation of the longer
    run (a multiple of eval_every) in its first group of experiments: the rows, records and
    checkpoints are then those of a run launched with the larger num_rounds. Otherwise it
    is refused in one line, and the workdir is left as it was.
    """
    if "num_rounds" not in wd.grown:
        return saved
    was = wd.grown["num_rounds"]
    if saved is not None and (saved["group"] > 0 or saved["round"] % plan.eval_every):
        where = (
            f"experiment group {saved['group'] + 1} of {len(plan.groups)}"
            if saved["group"] > 0
            else f"round {saved['round']}, not a multiple of eval_every ({plan.eval_every})"
        )
        raise WorkdirError(
            f"workdir {wd.path} holds a run of num_rounds={was} saved at {where}: it cannot go "
            f"on to num_rounds={plan.num_rounds} as a run of that length would; keep "
            f"num_rounds={was}, use another --workdir, or --config.overwrite=True to replace it"
        )
    wd.adopt_config()
    done = 0 if saved is None else saved["round"]
    log.info("num_rounds raised from %d to %d: going on after round %d", was, plan.num_rounds, done)
    return saved


def _stop_here(stop: threading.Event | None, wd: Workdir | None, when: str) -> None:
    """A safe point: raises Interrupted if a stop was requested. A workdir that holds
    nothing of the run yet is removed (Workdir.discard), and the message says so."""
    if stop is None or not stop.is_set():
        return
    if wd is None or wd.discard():
        raise Interrupted(f"interrupted {when}: nothing was written", None)
    raise Interrupted(f"interrupted {when}: what the run did is saved", wd.path)


def _train(plan, programs, writer, checkpoints, saved, stop) -> tuple[float, float]:
    """Runs the groups from the checkpoint `saved` (or the start); (compile_s, train_s)."""
    last = len(plan.groups) - 1
    if saved is not None and (saved["group"], saved["round"]) == (last, plan.num_rounds):
        log.info("the workdir holds a finished run: writing its summary and report again")
        return saved["compile_s"], saved["train_s"]
    progress = Progress(len(plan.groups) * plan.num_rounds, len(plan.groups))
    progress.compiling(len(plan.groups[0]), plan.clients_per_round)
    t0 = time.perf_counter()
    seeds = np.asarray([e.seed for e in plan.experiments], np.int32)
    like = _place(programs, programs.init_states(jnp.asarray(seeds[list(plan.groups[0])])))
    compiled = programs.advance.lower(
        like,
        _place(programs, _pick(programs.scenarios, plan.groups[0])),
        programs.client_data,
        programs.test,
        jnp.int32(plan.eval_every),
    ).compile()
    compile_s = time.perf_counter() - t0
    progress.compiled(compile_s)
    _stop_here(stop, writer.workdir, "after compiling, before the next round")

    state = None
    if saved is not None:
        if saved["round"] < plan.num_rounds:
            state = checkpoints.restore(saved, like)
            state = state._replace(states=_place(programs, state.states), compile_s=compile_s)
        else:  # the checkpoint ends a group: go on with the next one
            saved = {**saved, "group": saved["group"] + 1, "round": 0}
        progress.resumed(saved["group"], saved["round"])
    first_group = 0 if saved is None else saved["group"]
    train_s = 0.0 if saved is None else saved["train_s"]
    lines = 0 if saved is None else saved["lines"]
    progress.start(first_group * plan.num_rounds + (saved or {}).get("round", 0))
    with _stop_on_interrupt(stop) as stop:
        for index in range(first_group, len(plan.groups)):
            group = plan.groups[index]
            if state is None:
                states = programs.init_states(jnp.asarray(seeds[list(group)]))
                states = _place(programs, states)
                state = checkpoint.start(index, states, train_s, lines, compile_s)
            state = _run_group(plan, programs, compiled, writer, checkpoints, state, progress, stop)
            train_s, lines, state = state.train_s, state.lines, None
    return compile_s, train_s


def _run_group(plan, programs, compiled, writer, checkpoints, state, progress, stop):
    """Advances one group from state.round to the end, chunk by chunk; its last state."""
    group = plan.groups[state.group]
    scenarios = _place(programs, _pick(programs.scenarios, group))
    saved_at = time.perf_counter()
    while state.round < plan.num_rounds:
        before = state.round
        todo = min(plan.eval_every, plan.num_rounds - before)
        t = time.perf_counter()
        states, records, confusion = compiled(
            state.states, scenarios, programs.client_data, programs.test, jnp.int32(todo)
        )
        records, confusion = sharding.to_host((records, confusion))
        elapsed = time.perf_counter() - t
        records = jax.tree.map(lambda r, n=todo: r[:, :n], records)
        state = _account(plan, group, state, states, records, elapsed)
        rows = _rows(plan, programs, writer, group, state, confusion, records)
        writer.chunk(group, before + 1, records, confusion, rows)
        state = state._replace(lines=state.lines + len(rows))
        progress.update(state.group * plan.num_rounds + state.round, state.group, state.round, rows)
        if len(plan.experiments) == 1 and state.diverged[0]:
            raise DivergenceError(
                f"the model diverged in round {state.diverged[0]}: a non-finite loss or "
                f"parameter (lower lr or momentum?); metrics up to round {state.round} are in "
                f"{writer.workdir.join('metrics.jsonl')}"
            )
        last_group = state.group == len(plan.groups) - 1
        unsaved_s = time.perf_counter() - saved_at
        if sharding.agree(
            _checkpoint_due(plan, state.round, last_group, unsaved_s) or stop.is_set()
        ):
            checkpoints.save(state)
            saved_at = time.perf_counter()
        if stop.is_set():
            raise Interrupted(
                f"stopped after round {state.round}"
                + (f" of experiment group {state.group + 1}" if len(plan.groups) > 1 else "")
                + ": the run was saved",
                writer.workdir.path,
            )
    return state


def _account(plan, group, state, states, records, elapsed: float) -> checkpoint.RunState:
    """The state after a chunk: new server states, detection counts, divergence, time."""
    g = len(group)
    detected = state.detected + np.asarray(
        jax.vmap(defenses.detection_counts)(
            records.flags.reshape(g, -1), records.malicious.reshape(g, -1)
        )
    )
    finite = np.asarray(records.finite)  # [G, rounds of the chunk]
    new = ~finite.all(1) & (state.diverged == 0)
    first_bad = state.round + np.argmin(finite, 1) + 1  # 1-based round
    for slot, e in plan_lib.members(group):
        if new[slot]:
            log.warning(
                "experiment %d diverged in round %d: non-finite loss or parameters",
                e,
                first_bad[slot],
            )
    return state._replace(
        round=state.round + records.selected.shape[1],
        train_s=state.train_s + elapsed,
        states=states,
        detected=detected,
        diverged=np.where(new, first_bad, state.diverged).astype(np.int32),
        degenerate=(state.degenerate + np.asarray(records.degenerate).sum(1)).astype(np.int32),
    )


def _rows(plan, programs, writer, group, state, confusion, records) -> list[dict]:
    """One metrics row per real member of the group, for the evaluation after state.round."""
    rows = []
    for slot, e in plan_lib.members(group):
        exp = plan.experiments[e]
        row = evaluation.experiment_row(
            e, exp, programs.attack_of[e], confusion[slot], state.round, plan.measured_flips[e]
        )
        row.update(evaluation.chunk_facts(records, slot))
        row["degenerate_rounds"] = int(state.degenerate[slot])
        if programs.flags_clients[e]:
            row.update(evaluation.detection(state.detected[slot], records.flags[slot, -1]))
        evaluation.blank_diverged(row, int(state.diverged[slot]))
        rows.append(evaluation.add_window(row, writer.history(e), plan.eval_window))
    return rows


@contextlib.contextmanager
def _stop_on_interrupt(given: threading.Event | None):
    """A flag that the first Ctrl-C or SIGTERM (a scheduler's preemption) sets: the run stops
    after its chunk and saves; a second one stops at once. `given`: the caller's own request,
    its signals handled by the caller. Outside the main thread, the signals keep their usual
    meaning."""
    if given is not None:
        yield given
        return
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handle(signum, frame):
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        log.warning("stopping after this evaluation to save the run (Ctrl-C again: at once)")

    previous = {s: signal.signal(s, handle) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _place(programs, tree):
    """Puts a group's [G] pytree on the device(s), split over the experiment axis."""
    return sharding.by_experiment(programs.mesh, tree)


def _pick(tree, members):
    return jax.tree.map(lambda a: a[np.asarray(members)], tree)


def _checkpoint_due(plan, round_done: int, last_group: bool, unsaved_s: float) -> bool:
    """Whether to save after this evaluation: every checkpoint_every rounds, or with 0 after
    AUTO_CHECKPOINT_S of unsaved work; always at the end of a group."""
    if round_done == plan.num_rounds:
        return True
    if plan.checkpoint_every:
        return round_done % plan.checkpoint_every == 0
    return unsaved_s >= AUTO_CHECKPOINT_S
