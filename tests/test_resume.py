"""Kill real runs with SIGKILL at many points and resume them with the same command.

After every kill the same command goes on from the last checkpoint; at the end metrics.jsonl,
summary.json (but for its timings) and curves.png equal those of an uninterrupted run, byte
for byte. A driver script runs launch.py and kills its own process at a chosen point: after
the n-th metrics append, after the n-th checkpoint, inside orbax's commit of a checkpoint
(before one of its renames), or before the plots; one run is killed from outside, at
whatever point it has reached.
"""

import json
import os
import signal
import subprocess
import sys

import pytest
from test_simulation import tiny_config

from fedjax_poison import errors
from fedjax_poison.runner import checkpoint, train

pytestmark = pytest.mark.slow  # real runs killed and resumed: minutes on 2 cores

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMING = (
    "compile_s",
    "train_and_eval_s",
    "rounds_per_s",
    "experiment_rounds_per_s",
    "examples_per_s",
)
TINY = [
    "--config=configs/fashion_mnist.py:smoke",
    "--config.data.synthetic_train=480",
    "--config.data.synthetic_test=200",
    "--config.num_clients=8",
    "--config.clients_per_round=3",
    "--config.batch_size=20",
    "--config.eval_batch_size=100",
    "--config.eval_every=2",
    # pca in detect mode: its window memory and the detection counts must survive a resume.
    "--config.defense.name=pca",
    "--config.defense.mode=detect",
    "--config.defense.pca.start_round=2",
    "--config.defense.pca.window=2",
]
DRIVER = """
import asyncio, json, os, signal, sys
sys.path.insert(0, os.getcwd())
from absl import app
from orbax.checkpoint._src.path import atomicity
from fedjax_poison.runner import checkpoint
from fedjax_poison.results import report
from fedjax_poison.runner import workdir

kind, _, at = os.environ.get("KILL", "none:0").partition(":")
calls = [0]

def kill_at(name):
    if name == kind:
        calls[0] += 1
        if calls[0] == int(at):
            os.kill(os.getpid(), signal.SIGKILL)

def wrap(owner, name, before=False):
    original = getattr(owner, name)
    def wrapped(*args, **kwargs):
        if before:
            kill_at(name)
        result = original(*args, **kwargs)
        if not before:
            kill_at(name)
        return result
    setattr(owner, name, wrapped)

original_append = workdir.Workdir.append_lines
def append_lines(self, name, rows):
    rows = list(rows)
    print("appended", json.dumps([[r["experiment"], r["round"]] for r in rows]), flush=True)
    original_append(self, name, rows)
    kill_at("append_lines")
workdir.Workdir.append_lines = append_lines
wrap(checkpoint.Checkpoints, "save")
wrap(report, "write_report", before=True)
original_finalize = atomicity.AtomicRenameTemporaryPath.finalize
async def finalize(self, *args, **kwargs):
    kill_at("finalize")  # inside a checkpoint's commit: the folders are written, not renamed
    return await original_finalize(self, *args, **kwargs)
atomicity.AtomicRenameTemporaryPath.finalize = finalize
if os.environ["ENTRY"] == "compare_defenses":
    from fedjax_poison import compare_defenses
    compare_defenses._cli()
else:
    import launch
    app.run(launch.main, flags_parser=launch.parse_flags)
"""


def launch(workdir, flags, kill=None, entry="launch"):
    """Runs the driver (launch.py, or entry 'compare_defenses': the matrix's command) to its
    end or its kill; returns (returncode, appended).

    appended: the (experiment, round) of every metrics row the launch wrote. kill
    'outside:n' sends SIGKILL from this process once the n-th append is reported.
    """
    env = dict(
        os.environ,
        JAX_COMPILATION_CACHE_DIR=os.path.expanduser("~/.cache/fedjax_poison_tests"),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        KILL=kill or "none:0",
        ENTRY=entry,
    )
    os.makedirs(os.path.dirname(workdir), exist_ok=True)
    driver = os.path.join(os.path.dirname(workdir), "driver.py")
    with open(driver, "w") as f:
        f.write(DRIVER)
    command = [sys.executable, driver, *TINY, *flags, f"--workdir={workdir}"]
    with open(workdir + ".log", "w") as log:
        proc = subprocess.Popen(
            command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=log, text=True
        )
        appended = []
        for line in proc.stdout:
            if line.startswith("appended "):
                appended.append([tuple(x) for x in json.loads(line[9:])])
                if kill == f"outside:{len(appended)}":
                    proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=300)
    if proc.returncode not in (0, -signal.SIGKILL):
        raise AssertionError(f"{command} failed:\n{open(workdir + '.log').read()[-3000:]}")
    return proc.returncode, [row for rows in appended for row in rows]


def latest_checkpoint(workdir):
    folder = os.path.join(workdir, "checkpoints")
    steps = [int(n) for n in os.listdir(folder) if n.isdigit()] if os.path.isdir(folder) else []
    return max(steps, default=0)


def outputs(workdir):
    """What must equal an uninterrupted run's: metrics, records, summary but for timings,
    tables and figures."""
    summary = json.load(open(os.path.join(workdir, "summary.json")))
    for key in TIMING:
        assert summary.pop(key) > 0
    read = lambda name: open(os.path.join(workdir, name), "rb").read()
    records = sorted(os.listdir(os.path.join(workdir, "records")))
    files = ["metrics.jsonl", "results.csv", "results.md", "curves.png", "curves.pdf"]
    return (
        summary,
        records,
        {name: read(name) for name in files + [f"records/{r}" for r in records]},
    )


def test_single_run_killed_at_six_points_resumes_identically(tmp_path):
    flags = ["--config.num_rounds=12", "--config.checkpoint_every=4"]
    # Figures are titled with the workdir's name: both runs get the same one.
    reference = str(tmp_path / "reference" / "run")
    assert launch(reference, flags)[0] == 0
    work = str(tmp_path / "work" / "run")
    # Evaluations after rounds 2, 4, ..., 12; checkpoints after rounds 4, 8 and 12.
    # Each launch: its kill point, the rounds it computes, its last checkpoint after it.
    plan = [
        ("finalize:3", [2, 4], 0),  # rows written, checkpoint 4 cut in its commit: start again
        ("append_lines:3", [2, 4, 6], 4),  # after row 6: back to checkpoint 4
        ("save:1", [6, 8], 8),  # just after checkpoint 8
        ("outside:1", [10], 8),  # from outside, while rounds 11 and 12 run
        ("finalize:1", [10, 12], 8),  # inside the commit of the last checkpoint: back to 8
        ("write_report:1", [10, 12], 12),  # finished and summarized, killed before the report
        (None, [], 12),  # finished: writes summary and plots again, computes nothing
    ]
    for kill, rounds, checkpoint_after in plan:
        code, appended = launch(work, flags, kill)
        assert code == (-signal.SIGKILL if kill else 0), kill
        assert [r for _, r in appended] == rounds, kill
        assert latest_checkpoint(work) == checkpoint_after, kill
        if kill == "finalize:3":  # the checkpoint was cut in mid-commit
            assert [n for n in os.listdir(os.path.join(work, "checkpoints")) if "tmp" in n]
    assert sorted(os.listdir(os.path.join(work, "checkpoints"))) == ["12", "8"]  # the last two
    assert outputs(work) == outputs(reference)
    kills = sum(1 for kill, _, _ in plan if kill)
    print(f"single run: {kills} kills, outputs identical to the uninterrupted run")


def test_sweep_killed_in_its_second_group_resumes_identically(tmp_path):
    # Experiments 0, 1, 2 (seeds) in groups [0, 1] and [2, 2]; checkpoints every 2 rounds.
    flags = [
        "--config.num_rounds=6",
        "--config.checkpoint_every=2",
        "--config.sweep.seed=(1, 2, 3)",
        "--config.sweep.max_parallel=2",
        "--config.defense.name=fedavg",  # quicker to compile; pca's memory is tested above
    ]
    # Figures are titled with the workdir's name: both runs get the same one.
    reference = str(tmp_path / "reference" / "run")
    assert launch(reference, flags)[0] == 0
    work = str(tmp_path / "work" / "run")
    code, appended = launch(work, flags, "append_lines:5")
    assert code == -signal.SIGKILL and appended[-1] == (2, 4)
    code, appended = launch(work, flags, "finalize:2")  # in checkpoint (2, 4)'s commit
    assert code == -signal.SIGKILL
    assert appended == [(2, 4)]  # group 1 resumed at its round 2: group 0 is not run again
    code, appended = launch(work, flags)
    assert code == 0 and appended == [(2, 4), (2, 6)]
    assert outputs(work) == outputs(reference)
    rows = [json.loads(line) for line in open(os.path.join(work, "metrics.jsonl"))]
    assert [(r["experiment"], r["round"]) for r in rows] == [
        (e, r)
        for group, rounds in (([0, 1], (2, 4, 6)), ([2], (2, 4, 6)))
        for r in rounds
        for e in group
    ]
    print("sweep: 2 kills in the second group, all outputs identical")


def test_matrix_killed_in_its_third_cell_resumes_identically(tmp_path):
    # Cells (attack, defense) in order: (none, fedavg), (none, median), (sign_flip, fedavg),
    # (sign_flip, median), each its 2 seeds as one group; evaluations and checkpoints
    # every 2 of 4 rounds.
    flags = [
        "--attacks=sign_flip",
        "--defenses=fedavg,median",
        "--seeds=0,1",
        "--config.num_rounds=4",
        "--config.checkpoint_every=2",
    ]
    # Figures are titled with the workdir's name: both runs get the same one.
    reference = str(tmp_path / "reference" / "matrix")
    assert launch(reference, flags, entry="compare_defenses")[0] == 0
    work = str(tmp_path / "work" / "matrix")
    code, appended = launch(work, flags, "append_lines:6", entry="compare_defenses")
    assert code == -signal.SIGKILL and len(appended) == 12  # 6 chunks of 2 experiments
    first, second = set(appended[8:10]), set(appended[10:12])  # the third cell
    assert {r for _, r in first} == {2} and {r for _, r in second} == {4}
    code, appended = launch(work, flags, entry="compare_defenses")
    # From the checkpoint after round 2 of the third cell: its round 4, then the fourth cell.
    assert code == 0 and len(appended) == 6 and set(appended[:2]) == second
    assert outputs(os.path.join(work, "run")) == outputs(os.path.join(reference, "run"))
    read = lambda folder, name: open(os.path.join(folder, name), "rb").read()
    for name in ("matrix.csv", "matrix.md", "matrix.png", "matrix.pdf"):
        assert read(work, name) == read(reference, name), name
    rows = [json.loads(line) for line in open(os.path.join(work, "run", "metrics.jsonl"))]
    cells = [(r["attack"], r["defense"]) for r in rows]
    assert [cells[i] for i in range(0, 16, 4)] == [
        ("none", "fedavg"),
        ("none", "median"),
        ("sign_flip", "fedavg"),
        ("sign_flip", "median"),
    ]  # one cell after the other, its seeds together
    print("matrix: killed in its third cell, all outputs identical")


def test_overwrite_replaces_a_run_of_another_config(tmp_path):
    c = tiny_config(num_rounds=4)
    train.train_and_evaluate(c, str(tmp_path))
    c.num_rounds, c.lr = 2, 0.5
    with pytest.raises(errors.UserError, match="lr is 0.001 there, 0.5 now"):
        train.train_and_evaluate(c, str(tmp_path))
    c.lr = 0.001
    with pytest.raises(errors.UserError, match="num_rounds=4, and num_rounds=2 would shorten"):
        train.train_and_evaluate(c, str(tmp_path))
    c.overwrite = True
    train.train_and_evaluate(c, str(tmp_path))
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["round"] for r in rows] == [2]
    c.checkpoint_every = 2  # does not change results: resumes (here: nothing left to run)
    c.overwrite = False
    assert train.train_and_evaluate(c, str(tmp_path))["final"] == [rows[-1]]


def test_more_rounds_on_a_finished_run_continue_it_identically(tmp_path):
    """num_rounds raised on a finished run goes on from its last checkpoint: every output
    equals a run launched with the larger number (the launch tests above compare the same)."""
    flags = ["--config.eval_every=1"]
    reference = str(tmp_path / "reference" / "run")
    assert launch(reference, [*flags, "--config.num_rounds=5"])[0] == 0
    work = str(tmp_path / "work" / "run")
    assert launch(work, [*flags, "--config.num_rounds=3"])[0] == 0
    code, appended = launch(work, [*flags, "--config.num_rounds=5"])
    assert code == 0 and [r for _, r in appended] == [4, 5]  # rounds 1-3 are not run again
    assert outputs(work) == outputs(reference)
    marker = json.load(open(os.path.join(work, "fedjax_poison_run.json")))
    assert marker["config"]["num_rounds"] == 5


def test_more_rounds_change_the_stable_window_of_the_rows_before(tmp_path):
    """2 rounds evaluated each round average 1 evaluation (the last 10%), 20 average 2: the
    rows of the first launch get the longer run's window values."""
    straight = tmp_path / "straight"
    train.train_and_evaluate(tiny_config(num_rounds=20, eval_every=1), str(straight))
    c = tiny_config(num_rounds=2, eval_every=1)
    train.train_and_evaluate(c, str(tmp_path / "grown"))
    c.num_rounds = 20
    train.train_and_evaluate(c, str(tmp_path / "grown"))
    read = lambda d: (d / "metrics.jsonl").read_text()
    assert read(tmp_path / "grown") == read(straight)


def test_more_rounds_than_a_run_can_go_on_to_are_refused_and_leave_it(tmp_path):
    """A run whose last checkpoint falls between two evaluations of the longer run would not
    match it: refused in one line, the workdir still the shorter run's."""
    c = tiny_config(num_rounds=3, eval_every=2)
    train.train_and_evaluate(c, str(tmp_path))
    metrics = (tmp_path / "metrics.jsonl").read_bytes()
    c.num_rounds = 4
    with pytest.raises(errors.UserError, match="saved at round 3, not a multiple of eval_every"):
        train.train_and_evaluate(c, str(tmp_path))
    assert (tmp_path / "metrics.jsonl").read_bytes() == metrics
    c.num_rounds = 3  # the run as it was: finished
    assert train.train_and_evaluate(c, str(tmp_path))["num_rounds"] == 3


def test_a_torn_last_row_is_dropped_and_a_shortened_file_refused(tmp_path):
    c = tiny_config(num_rounds=4, checkpoint_every=2)
    train.train_and_evaluate(c, str(tmp_path))
    metrics = tmp_path / "metrics.jsonl"
    whole = metrics.read_text()
    with open(metrics, "a") as f:
        f.write('{"round": 6, "accur')  # what a kill in mid-append leaves
    train.train_and_evaluate(c, str(tmp_path))  # finished: nothing to run, the tear is cut
    assert metrics.read_text() == whole
    metrics.write_text("".join(whole.splitlines(keepends=True)[:-1]))
    with pytest.raises(checkpoint.CheckpointError, match="wrote 2 rows up to round 4 .* holds 1"):
        train.train_and_evaluate(c, str(tmp_path))


def test_without_checkpoint_every_a_run_saves_when_work_would_be_lost(tmp_path, monkeypatch):
    """checkpoint_every = 0 saves after the first evaluation AUTO_CHECKPOINT_S after the last
    save, and at the end: a killed run loses at most about that much work."""
    saved = []
    save = checkpoint.Checkpoints.save
    monkeypatch.setattr(
        checkpoint.Checkpoints, "save", lambda self, s: (saved.append(s.round), save(self, s))[1]
    )
    c = tiny_config(num_rounds=3, eval_every=1)
    monkeypatch.setattr(train, "AUTO_CHECKPOINT_S", 0.0)  # every evaluation is due
    train.train_and_evaluate(c, str(tmp_path / "due"))
    assert saved == [1, 2, 3]
    saved.clear()
    monkeypatch.setattr(train, "AUTO_CHECKPOINT_S", 1e9)  # none is due: only the end
    train.train_and_evaluate(c, str(tmp_path / "end"))
    assert saved == [3]
