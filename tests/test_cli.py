"""launch.py as a user meets it: one line and status 2 for a mistake, the workdir guarded,
Ctrl-C saved and resumed, a run without --workdir, a terminal without library noise."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from fedjax_poison.runner import checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(REPO, "launch.py")
SMOKE = f"--config={os.path.join(REPO, 'configs', 'fashion_mnist.py')}:smoke"
TINY = [
    SMOKE,
    "--config.data.synthetic_train=480",
    "--config.data.synthetic_test=200",
    "--config.num_clients=8",
    "--config.clients_per_round=3",
    "--config.batch_size=20",
    "--config.eval_batch_size=100",
    "--config.tensorboard=False",
]


def env():
    return dict(
        os.environ,
        JAX_COMPILATION_CACHE_DIR=os.path.expanduser("~/.cache/fedjax_poison_tests"),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        PYTHONUNBUFFERED="1",
    )


def launch(*args, cwd=REPO, timeout=600):
    return subprocess.run(
        [sys.executable, LAUNCH, *args],
        cwd=cwd,
        env=env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def one_line_error(proc) -> str:
    """The error line of a launch that stopped on a user mistake (status 2, no traceback)."""
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


@pytest.mark.parametrize(
    "args,expected",
    [
        (["--config.attack.malicious_frac=0.5"], "did you mean attack.malicious_fraction?"),
        (["--config.num_clients=1000", "--config.clients_per_round=5"], "num_clients=1000"),
        (["--config.mesh.clients=9"], "mesh.experiments x mesh.clients = 1 x 9 needs 9"),
        (["--config.num_rounds=abc"], "--config.num_rounds=abc"),
        (["--config.attack.name=lable_flip"], "did you mean 'label_flip'"),
        (["--config.defense.name=medain"], "defense.name"),
        (["--config.attack.scale.factor=-1", "--config.attack.name=scale"], "attack.scale.factor"),
        (["--config.sweep.alpha=(0.1, 0.2)"], "sweep.alpha changes no experiment"),
        (["--config.attack.start_round=99"], "attack.start_round must be <= num_rounds"),
    ],
)
@pytest.mark.slow  # the quick tier leaves launches and large compiles out
def test_a_mistake_is_one_line_and_status_2(args, expected, tmp_path):
    proc = launch(*TINY, *args, f"--workdir={tmp_path / 'w'}")
    assert expected in one_line_error(proc)


@pytest.mark.slow  # the quick tier leaves launches and large compiles out
def test_a_config_file_or_variant_that_does_not_exist(tmp_path):
    proc = launch(f"{SMOKE.rsplit(':', 1)[0]}:tiny", f"--workdir={tmp_path}")
    assert "unknown variant 'tiny'" in one_line_error(proc)
    proc = launch("--config=configs/nope.py", f"--workdir={tmp_path}")
    assert "No such file or directory: 'configs/nope.py'" in one_line_error(proc)


@pytest.mark.slow  # the quick tier leaves launches and large compiles out
def test_the_workdir_is_guarded(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    message = one_line_error(launch(*TINY, f"--workdir={foreign}"))
    assert "thesis.tex" in message and "nothing was deleted" in message
    assert os.listdir(foreign) == ["thesis.tex"]
    # An unset shell variable: --workdir= must not become the current folder.
    message = one_line_error(launch(*TINY, "--workdir=", cwd=foreign))
    assert "--workdir is empty" in message and os.listdir(foreign) == ["thesis.tex"]
    message = one_line_error(launch(*TINY, f"--workdir={foreign / 'thesis.tex'}"))
    assert "is a file, not a folder" in message


@pytest.mark.slow  # a whole run
def test_a_damaged_metrics_file_is_refused_and_left_as_it_is(tmp_path):
    flags = [*TINY, "--config.num_rounds=6", "--config.eval_every=2", f"--workdir={tmp_path}"]
    assert launch(*flags).returncode == 0
    metrics = tmp_path / "metrics.jsonl"
    lines = metrics.read_bytes().splitlines(keepends=True)
    damaged = lines[0] + b'{"round": 4, "accur\n' + b"".join(lines[2:])
    metrics.write_bytes(damaged)
    message = one_line_error(launch(*flags))
    assert "metrics.jsonl line 2 is not JSON" in message
    assert metrics.read_bytes() == damaged


@pytest.mark.slow  # the quick tier leaves launches and large compiles out
def test_a_config_for_another_dataset_is_refused(tmp_path):
    proc = launch(*TINY, "--config.dataset=cifar10", f"--workdir={tmp_path}")
    message = one_line_error(proc)
    assert "model.name must take cifar10's 32x32x3 images" in message


def wait_for(proc, text: str, lines: list, limit: float = 600) -> None:
    """Reads proc's stderr into `lines` until a line holds `text`."""
    end = time.time() + limit
    while time.time() < end:
        line = proc.stderr.readline()
        if not line:
            break
        lines.append(line)
        if text in line:
            return
    raise AssertionError("".join(lines)[-3000:])


def stop_running(signum, *args, then=lambda proc: None):
    """Launches args, waits for round 2 of 200, calls then(proc), sends signum; (exit status,
    the output up to round 2, the rest)."""
    proc = subprocess.Popen(
        [sys.executable, LAUNCH, *args], cwd=REPO, env=env(), stderr=subprocess.PIPE, text=True
    )
    lines = []
    try:
        wait_for(proc, "round 2/200", lines)
        then(proc)
        proc.send_signal(signum)
        rest = proc.stderr.read()
        proc.wait(timeout=300)
    finally:
        proc.kill()
    return proc.returncode, "".join(lines), rest


@pytest.mark.slow  # a whole run
def test_lock_ctrl_c_and_resume(tmp_path):
    """A second launch on a running workdir is refused; Ctrl-C saves the run and prints the
    command that resumes it; that command finishes it (that the rows are those of a run never
    stopped: test_interruptions.py)."""
    flags = [*TINY, "--config.num_rounds=200", "--config.eval_every=1"]
    work = tmp_path / "work"

    def second_launch(proc):
        second = launch(*flags, f"--workdir={work}")
        assert f"is in use by pid {proc.pid}" in one_line_error(second)

    status, lines, rest = stop_running(
        signal.SIGINT, *flags, f"--workdir={work}", then=second_launch
    )
    assert status == 130, lines + rest
    assert "TPU" not in lines + rest and "Traceback" not in lines + rest
    for text in ("compiling the round", "compiled in", "rounds/s", "ETA"):
        assert text in lines + rest, text
    resume = rest.split("resume with:\n", 1)[1].strip().splitlines()[0].strip()
    assert resume.endswith(f"--workdir={work}")
    rows = [json.loads(line) for line in open(work / "metrics.jsonl")]
    stopped = rows[-1]["round"]
    assert stopped < 200

    finished = subprocess.run(
        resume, shell=True, cwd=REPO, env=env(), capture_output=True, text=True, timeout=600
    )
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert f"resuming after round {stopped}" in finished.stderr and "results in" in finished.stderr
    rows = [json.loads(line) for line in open(work / "metrics.jsonl")]
    assert [r["round"] for r in rows] == list(range(1, 201))


@pytest.mark.slow  # a whole run
def test_sigterm_saves_like_ctrl_c(tmp_path):
    """A scheduler's preemption (SIGTERM) stops after the evaluation, saves, and says how to
    resume, as Ctrl-C does."""
    work = tmp_path / "work"
    flags = [*TINY, "--config.num_rounds=200", "--config.eval_every=1", f"--workdir={work}"]
    status, lines, rest = stop_running(signal.SIGTERM, *flags)
    assert status == 130, lines + rest
    assert "the run was saved; resume with:" in rest
    stopped = json.loads(open(work / "metrics.jsonl").read().splitlines()[-1])["round"]
    saved = checkpoint.Checkpoints(str(work / checkpoint.FOLDER), 200)
    try:
        assert saved.latest()["round"] == stopped
    finally:
        saved.close()


@pytest.mark.slow  # a whole run
def test_without_workdir_the_run_goes_to_runs(tmp_path):
    proc = launch(*TINY, "--config.num_rounds=2", "--config.eval_every=2", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (stamp,) = os.listdir(tmp_path / "runs" / "fashion_mnist_smoke")
    workdir = tmp_path / "runs" / "fashion_mnist_smoke" / stamp
    assert f"workdir: {os.path.join('runs', 'fashion_mnist_smoke', stamp)}" in proc.stderr
    assert (workdir / "summary.json").stat().st_mode & 0o777 == 0o644  # others can read


@pytest.mark.slow  # the quick tier leaves launches and large compiles out
def test_a_coordinator_that_cannot_be_reached_is_one_line_after_the_timeout(tmp_path):
    """Process 1 of 2 with nobody at the coordinator's port: one line once
    distributed.timeout_s has passed, status 2, never jax's C++ abort."""
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = launch(
        *TINY,
        f"--config.distributed.coordinator=127.0.0.1:{port}",
        "--config.distributed.num_processes=2",
        "--config.distributed.process_id=1",
        "--config.distributed.timeout_s=2",
        f"--workdir={tmp_path / 'w'}",
    )
    message = one_line_error(proc)
    assert f"cannot reach the coordinator 127.0.0.1:{port} within 2 s" in message
    assert "Check failure" not in proc.stderr and "DEADLINE_EXCEEDED" not in proc.stderr
    assert not (tmp_path / "w").exists()
    message = one_line_error(
        launch(*TINY, "--config.distributed.timeout_s=0", f"--workdir={tmp_path}")
    )
    assert "distributed.timeout_s" in message and "must be in [1, 86400]" in message
