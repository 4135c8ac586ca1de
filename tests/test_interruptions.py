"""Ctrl-C (SIGINT) and SIGTERM at every moment of a launch: one line, status 130, never a
traceback or a crash, the command that resumes it once a workdir holds the run, and that
command finishing with the results of a run never stopped.

A driver runs launch.py as the program and makes it signal itself at a named moment (an
import hook puts the signal inside the function that marks the moment), then waits for the
signal to be seen: no test depends on how long anything takes.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from test_cli import LAUNCH, REPO, TINY, env
from test_report import write_workdir
from test_resume import outputs

from fedjax_poison.runner.workdir import Workdir

FLAGS = [*TINY, "--config.num_rounds=4", "--config.eval_every=2", "--config.checkpoint_every=2"]
DRIVER = r'''
import importlib.abc, os, runpy, signal, sys, time

moment, _, sig = os.environ.get("STOP_AT", "").partition(":")
signum = getattr(signal, sig or "SIGINT")
counts = {}


def stop_here(name, nth=1, times=1):
    """Signals this process at the nth call of moment `name`; waits until the signal is seen."""
    if name != moment:
        return
    counts[name] = counts.get(name, 0) + 1
    if counts[name] != nth:
        return
    request = getattr(sys.modules["__main__"], "STOP", None)
    for _ in range(times):
        os.kill(os.getpid(), signum)
        if request is not None:
            request.wait(60)
    if times > 1:
        time.sleep(600)  # the second signal ends the process


def around(owner, attr, name, nth=1, after=False, times=1, when=lambda *a, **k: True):
    original = getattr(owner, attr, None)
    if original is None:  # a version without that step
        return

    def wrapped(*args, **kwargs):
        if not after and when(*args, **kwargs):
            stop_here(name, nth, times)
        result = original(*args, **kwargs)
        if after and when(*args, **kwargs):
            stop_here(name, nth, times)
        return result

    setattr(owner, attr, wrapped)


def patch_plan(m):
    around(m, "build", "config", after=True)


def patch_setup(m):
    around(m, "build", "setup", after=False)


def patch_stages(m):
    around(m.Lowered, "compile", "compile")
    around(m.Lowered, "compile", "compile_twice", times=2)


def patch_sharding(m):
    around(m, "wait_for_coordinator", "coordinator")
    around(m, "to_host", "first_round")
    around(m, "leave_distributed", "finished")


def patch_workdir(m):
    around(m.Workdir, "append_lines", "mid_run", after=True)
    around(m.Workdir, "write_json", "summary", after=True, when=lambda s, n, o: n == "summary.json")


def patch_report(m):
    around(m, "write_report", "report")


def patch_atomicity(m):
    original = m.AtomicRenameTemporaryPath.finalize

    async def finalize(self, *args, **kwargs):
        stop_here("checkpoint")  # inside the commit of the first checkpoint
        return await original(self, *args, **kwargs)

    m.AtomicRenameTemporaryPath.finalize = finalize


def patch_checkpoint(m):
    around(m.Checkpoints, "save", "last_checkpoint", nth=2)  # as the last one is written


PATCHES = {
    "fedjax_poison.config.plan": patch_plan,
    "fedjax_poison.runner.setup": patch_setup,
    "jax._src.stages": patch_stages,
    "fedjax_poison.round.sharding": patch_sharding,
    "fedjax_poison.runner.workdir": patch_workdir,
    "fedjax_poison.results.report": patch_report,
    "orbax.checkpoint._src.path.atomicity": patch_atomicity,
    "fedjax_poison.runner.checkpoint": patch_checkpoint,
}


class Hook(importlib.abc.MetaPathFinder):
    """Signals on the import of jax (moment 'imports'); patches modules once loaded."""

    def find_spec(self, name, path, target=None):
        if name == "jax":
            stop_here("imports")
        if name not in PATCHES:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                break
        else:
            return None
        execute = spec.loader.exec_module

        def exec_module(module):
            execute(module)
            PATCHES[name](module)

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, Hook())
sys.argv[0] = sys.argv.pop(1)  # launch.py, as the user typed it
sys.path.insert(0, os.path.dirname(sys.argv[0]))
runpy.run_path(sys.argv[0], run_name="__main__")
'''


def launch_at(
    tmp_path, moment: str, workdir, sig="SIGINT", extra=()
) -> subprocess.CompletedProcess:
    """launch.py on FLAGS (and `extra`) into workdir, signalled (`sig`) at `moment`; checks
    what every stopped launch must show: no traceback, no crash, status 130 (0 once
    finished)."""
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    proc = subprocess.run(
        [sys.executable, str(driver), LAUNCH, *FLAGS, *extra, f"--workdir={workdir}"],
        cwd=REPO,
        env={**env(), "STOP_AT": f"{moment}:{sig}"},
        capture_output=True,
        text=True,
        timeout=900,
    )
    for text in ("Traceback", "Segmentation", "Fatal Python error", "core dumped"):
        assert text not in proc.stderr, proc.stderr[-3000:]
    assert proc.returncode == (0 if moment in ("report", "finished") else 130), proc.stderr[-3000:]
    return proc


def resume_line(proc, workdir) -> str:
    """The command a stopped launch printed to resume it."""
    assert "resume with:\n" in proc.stderr, proc.stderr[-3000:]
    command = proc.stderr.split("resume with:\n", 1)[1].splitlines()[0].strip()
    assert command.endswith(f"--workdir={workdir}") and LAUNCH in command
    return command


def resume(command: str) -> None:
    """Runs the printed command (without the driver): it must finish the run."""
    done = subprocess.run(
        command, shell=True, cwd=REPO, env=env(), capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-3000:]


def error_lines(proc) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("error: ")]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The outputs of the run never stopped (the figures name the folder: 'run' for all)."""
    workdir = tmp_path_factory.mktemp("reference") / "run"
    proc = subprocess.run(
        [sys.executable, LAUNCH, *FLAGS, f"--workdir={workdir}"],
        cwd=REPO,
        env=env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return outputs(str(workdir))


@pytest.mark.parametrize("moment", ["imports", "config"])
@pytest.mark.slow  # the quick tier leaves launches and large compiles out
def test_interrupted_while_loading_writes_nothing(tmp_path, moment):
    workdir = tmp_path / "run"
    proc = launch_at(tmp_path, moment, workdir)
    assert error_lines(proc) == ["error: interrupted before the run started: nothing was written"]
    assert not workdir.exists()


@pytest.mark.slow  # the quick tier leaves launches and large compiles out
def test_interrupted_while_waiting_for_the_coordinator_stops_waiting(tmp_path):
    """Process 1 of 2 waits up to distributed.timeout_s for a coordinator nobody started:
    Ctrl-C ends the wait (one line, status 130), not the timeout."""
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    distributed = [
        f"--config.distributed.coordinator=127.0.0.1:{port}",
        "--config.distributed.num_processes=2",
        "--config.distributed.process_id=1",
        "--config.distributed.timeout_s=600",
    ]
    workdir = tmp_path / "run"
    proc = launch_at(tmp_path, "coordinator", workdir, extra=distributed)
    assert error_lines(proc) == ["error: interrupted before the run started: nothing was written"]
    assert not workdir.exists()


@pytest.mark.slow  # loads the data
@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_interrupted_while_setting_up_leaves_no_folder(tmp_path, sig):
    workdir = tmp_path / "run"
    proc = launch_at(tmp_path, "setup", workdir, sig)
    assert error_lines(proc) == ["error: interrupted while setting up: nothing was written"]
    assert "resume with" not in proc.stderr
    assert not workdir.exists()


@pytest.mark.slow  # a whole run
def test_interrupted_while_compiling_resumes_identically(tmp_path, reference):
    """SIGTERM (a scheduler's preemption); Ctrl-C while compiling: the test after this one,
    and both signals take one path (signals.py)."""
    workdir = tmp_path / "run"
    proc = launch_at(tmp_path, "compile", workdir, "SIGTERM")
    assert "interrupted after compiling, before the next round" in error_lines(proc)[0]
    assert not (workdir / "checkpoints").exists() or not os.listdir(workdir / "checkpoints")
    resume(resume_line(proc, workdir))
    assert outputs(str(workdir)) == reference


@pytest.mark.slow  # a whole run
def test_a_second_ctrl_c_while_compiling_stops_at_once(tmp_path, reference):
    workdir = tmp_path / "run"
    proc = launch_at(tmp_path, "compile_twice", workdir)
    assert error_lines(proc) == ["error: interrupted again: stopped at once; resume with:"]
    resume(resume_line(proc, workdir))
    assert outputs(str(workdir)) == reference


def saved_round(workdir) -> int:
    rows = (workdir / "metrics.jsonl").read_text().splitlines()
    return json.loads(rows[-1])["round"] if rows else 0


@pytest.mark.slow  # a whole run
@pytest.mark.parametrize(
    "moment,sig,stopped",
    [
        ("first_round", "SIGINT", 2),  # the first chunk finishes, is saved, then it stops
        ("mid_run", "SIGTERM", 2),  # after the first metrics row
        ("checkpoint", "SIGINT", 2),  # inside the commit of checkpoint 2: it completes
        ("last_checkpoint", "SIGTERM", 4),  # as the last one is written: all rounds saved
    ],
)
def test_interrupted_between_rounds_saves_and_resumes_identically(
    tmp_path, moment, sig, stopped, reference
):
    workdir = tmp_path / "run"
    proc = launch_at(tmp_path, moment, workdir, sig)
    assert error_lines(proc) == [
        f"error: stopped after round {stopped}: the run was saved; resume with:"
    ]
    assert saved_round(workdir) == stopped
    assert sorted(os.listdir(workdir / "checkpoints")) == [str(r) for r in (2, 4) if r <= stopped]
    resume(resume_line(proc, workdir))
    assert outputs(str(workdir)) == reference


@pytest.mark.slow  # a whole run
def test_interrupted_while_writing_the_summary_resumes_to_the_report(tmp_path, reference):
    workdir = tmp_path / "run"
    proc = launch_at(tmp_path, "summary", workdir, "SIGTERM")
    assert "interrupted before the report (the rounds are all done)" in error_lines(proc)[0]
    assert not (workdir / "results.md").exists()
    resume(resume_line(proc, workdir))
    assert outputs(str(workdir)) == reference


@pytest.mark.slow  # a whole run
@pytest.mark.parametrize("moment", ["report", "finished"])
def test_interrupted_once_the_report_is_written_ends_as_finished(tmp_path, moment, reference):
    """The report is the last step: a signal while it is written lets it finish (seconds),
    and the run ends as a finished one, status 0."""
    workdir = tmp_path / "run"
    proc = launch_at(tmp_path, moment, workdir)
    assert "the run had finished when it was interrupted" in proc.stderr
    assert outputs(str(workdir)) == reference


def report_waiting_on_a_pipe(path):
    """A run's files whose config.json is a pipe: the report waits on it while reading."""
    write_workdir(path)
    os.remove(path / "config.json")
    os.mkfifo(path / "config.json")
    return ["report", str(path)], path / "config.json"


def analysis_waiting_on_a_pipe(path):
    """A run whose features file is a pipe: the analysis waits on it while reading."""
    Workdir.claim(str(path), {"save_features": True}, overwrite=False).release()
    (path / "features").mkdir()
    os.mkfifo(path / "features" / "r00001_e0000.npz")
    return ["pca_analysis", f"--workdir={path}"], path / "features" / "r00001_e0000.npz"


@pytest.mark.parametrize(
    "make", [report_waiting_on_a_pipe, analysis_waiting_on_a_pipe], ids=["report", "pca_analysis"]
)
@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
@pytest.mark.slow  # the quick tier leaves launches and large compiles out
def test_interrupted_while_reading_a_run_report_and_analysis_stop_in_one_line(tmp_path, make, sig):
    """The signal arrives while the command is provably inside its work: reading a pipe."""
    (module, *args), pipe_path = make(tmp_path / "run")
    before = sorted(os.listdir(tmp_path / "run"))
    process = subprocess.Popen(
        [sys.executable, "-m", f"fedjax_poison.{module}", *args],
        cwd=REPO,
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    while True:  # a writer can open the pipe only once the command has opened it to read
        try:
            pipe = os.open(pipe_path, os.O_WRONLY | os.O_NONBLOCK)
            break
        except OSError:
            assert process.poll() is None, process.communicate()
            time.sleep(0.05)
    try:
        process.send_signal(getattr(signal, sig))
        _, err = process.communicate(timeout=120)
    finally:
        os.close(pipe)
    assert process.returncode == 130, err
    assert err.splitlines()[-1:] == ["error: interrupted: the files written so far are whole"]
    assert "Traceback" not in err
    assert sorted(os.listdir(tmp_path / "run")) == before
