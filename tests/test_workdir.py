"""The workdir: what a run may delete, when two runs collide, and what a damaged file does."""

import errno
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
from test_report import write_workdir
from test_simulation import tiny_config

from fedjax_poison import errors, report
from fedjax_poison.runner import train, workdir
from fedjax_poison.runner.workdir import LOCK, MARKER, Workdir, WorkdirError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = {"dataset": "fashion_mnist", "lr": 0.01, "overwrite": False, "checkpoint_every": 10}
ROWS = [{"round": 1, "accuracy": 0.5}, {"round": 2, "accuracy": 0.625}]


def claim(path, config=CONFIG, overwrite=False, **kwargs) -> Workdir:
    return Workdir.claim(str(path), config, overwrite=overwrite, **kwargs)


def tree(path) -> dict:
    """Every file under `path` (but the lock) and its bytes."""
    found = {}
    for folder, _, files in os.walk(path):
        for name in files:
            full = os.path.join(folder, name)
            if name != LOCK:
                with open(full, "rb") as f:
                    found[os.path.relpath(full, path)] = f.read()
    return found


def write_run(w: Workdir) -> None:
    """What a run leaves: metrics, summary, features, plots and an orbax-like folder."""
    w.write_json("config.json", CONFIG)
    w.append_lines("metrics.jsonl", ROWS)
    w.write_json("summary.json", {"final": ROWS, "loss": float("nan")})
    w.write_bytes("features/r00000_e0000.npz", b"features")
    w.write_bytes("plots/accuracy.png", b"png")
    folder = w.folder("checkpoints")
    w.own("checkpoints/4")  # as Checkpoints.save lists a step's folder before orbax writes it
    os.makedirs(os.path.join(folder, "4"))
    with open(os.path.join(w.folder("checkpoints"), "4", "ocdbt.process_0"), "wb") as f:
        f.write(b"orbax")


def one_line_error(excinfo, *words) -> str:
    message = str(excinfo.value)
    assert isinstance(excinfo.value, errors.UserError)
    assert "\n" not in message and all(w in message for w in words), message
    return message


def test_fresh_workdir_is_created_and_marked(tmp_path):
    with claim(tmp_path / "runs" / "a") as w:
        assert not w.resumed
        write_run(w)
    marker = json.loads((tmp_path / "runs" / "a" / MARKER).read_text())
    assert marker["tool"] == "fedjax_poison" and marker["config"] == CONFIG
    assert marker["paths"]["features"] == "folder"
    assert marker["paths"]["checkpoints"] == "handed"
    assert marker["paths"]["checkpoints/4"] == "owned"
    assert marker["paths"]["metrics.jsonl"] == "file"


def test_same_config_resumes_with_nothing_deleted(tmp_path):
    with claim(tmp_path) as w:
        write_run(w)
    before = tree(tmp_path)
    resumable = {**CONFIG, "overwrite": True, "checkpoint_every": 0}
    with claim(tmp_path, resumable) as w:
        assert w.resumed
        assert w.read_lines("metrics.jsonl") == ROWS
    assert tree(tmp_path) == before


def test_another_config_is_refused_naming_the_field(tmp_path):
    with claim(tmp_path) as w:
        write_run(w)
    before = tree(tmp_path)
    with pytest.raises(WorkdirError) as excinfo:
        claim(tmp_path, {**CONFIG, "lr": 0.1})
    one_line_error(excinfo, "lr is 0.01 there, 0.1 now", "overwrite")
    assert tree(tmp_path) == before


def test_overwrite_deletes_the_runs_files_only(tmp_path):
    with claim(tmp_path) as w:
        write_run(w)
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "plots" / "mine.png").write_bytes(b"mine")
    with claim(tmp_path, {**CONFIG, "lr": 0.1}, overwrite=True) as w:
        assert not w.resumed
        w.write_bytes("plots/loss.png", b"new")
    assert tree(tmp_path) == {
        "notes.txt": b"mine",
        "plots/mine.png": b"mine",
        "plots/loss.png": b"new",
        MARKER: (tmp_path / MARKER).read_bytes(),
    }
    assert not (tmp_path / "features").exists() and not (tmp_path / "checkpoints").exists()
    assert json.loads((tmp_path / MARKER).read_text())["config"]["lr"] == 0.1


def test_a_tool_adds_files_to_a_finished_run_that_overwrite_then_deletes(tmp_path):
    with claim(tmp_path / "run") as w:
        write_run(w)
    with Workdir.attach(tmp_path / "run") as w:  # whatever its config, as pca_analysis does
        w.write_text("pca_verdicts.csv", "round,client\n")
        with pytest.raises(WorkdirError) as excinfo:
            claim(tmp_path / "run")
        one_line_error(excinfo, f"pid {os.getpid()}")
    with claim(tmp_path / "run", {**CONFIG, "lr": 0.1}, overwrite=True):
        assert not (tmp_path / "run" / "pca_verdicts.csv").exists()
    (tmp_path / "notes").mkdir()
    with pytest.raises(WorkdirError) as excinfo:
        Workdir.attach(tmp_path / "notes")
    one_line_error(excinfo, str(tmp_path / "notes"), MARKER)
    assert os.listdir(tmp_path / "notes") == []


@pytest.mark.parametrize("path", ["", "   ", None])
def test_empty_workdir_is_refused_and_the_current_folder_untouched(tmp_path, monkeypatch, path):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "metrics.jsonl").write_text('{"round": 1}\n')
    (tmp_path / "checkpoints").mkdir()
    before = tree(tmp_path)
    for primary in (True, False):
        with pytest.raises(WorkdirError) as excinfo:
            Workdir.claim(path, CONFIG, overwrite=True, primary=primary)
        one_line_error(excinfo, "--workdir is empty")
    assert tree(tmp_path) == before and sorted(os.listdir(tmp_path)) == [
        "checkpoints",
        "metrics.jsonl",
    ]


def test_a_file_is_refused_as_workdir(tmp_path):
    (tmp_path / "run").write_text("a file")
    for path in (tmp_path / "run", tmp_path / "run" / "sub"):
        with pytest.raises(WorkdirError) as excinfo:
            claim(path, overwrite=True)
        one_line_error(excinfo, str(path))
    assert (tmp_path / "run").read_text() == "a file"


def test_a_foreign_folder_is_refused_naming_a_file_and_nothing_deleted(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "summary.json").write_text("{}")
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "1").write_text("old")
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(WorkdirError) as excinfo:
        claim(tmp_path, overwrite=True)
    one_line_error(excinfo, str(tmp_path), "checkpoints", "nothing was deleted")
    assert sorted(os.listdir(tmp_path)) == before  # not even a lock file
    assert (tmp_path / "checkpoints" / "1").read_text() == "old"


def test_a_manifest_pointing_outside_the_workdir_deletes_nothing(tmp_path):
    (tmp_path / "victim.txt").write_text("keep")
    run = tmp_path / "run"
    with claim(run) as w:
        w.write_text("a.txt", "a")
    marker = json.loads((run / MARKER).read_text())
    marker["paths"]["../victim.txt"] = "file"
    (run / MARKER).write_text(json.dumps(marker))
    with pytest.raises(WorkdirError) as excinfo:
        claim(run, {**CONFIG, "lr": 1.0}, overwrite=True)
    one_line_error(excinfo, MARKER, "nothing was deleted")
    assert (tmp_path / "victim.txt").read_text() == "keep" and (run / "a.txt").exists()


def test_a_folder_made_a_link_out_of_the_workdir_is_not_followed(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "a.npz").write_bytes(b"keep")
    run = tmp_path / "run"
    with claim(run) as w:
        w.write_bytes("features/a.npz", b"run")
    os.remove(run / "features" / "a.npz")
    os.rmdir(run / "features")
    os.symlink(outside, run / "features")
    with claim(run, {**CONFIG, "lr": 0.1}, overwrite=True):
        assert (outside / "a.npz").read_bytes() == b"keep"


def test_a_second_claim_fails_naming_the_holder_until_released(tmp_path):
    first = claim(tmp_path)
    with pytest.raises(WorkdirError) as excinfo:
        claim(tmp_path)
    one_line_error(excinfo, str(tmp_path), f"pid {os.getpid()}")
    first.release()
    with claim(tmp_path) as again:
        assert again.resumed


def test_a_killed_runs_lock_is_free_again(tmp_path):
    holder = (
        "import sys, time\n"
        "from fedjax_poison.runner.workdir import Workdir\n"
        "w = Workdir.claim(sys.argv[1], {'lr': 0.01}, overwrite=False)\n"
        "print('claimed', flush=True)\n"
        "time.sleep(600)\n"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", holder, str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout.readline() == "claimed\n"
        with pytest.raises(WorkdirError) as excinfo:
            claim(tmp_path, {"lr": 0.01})
        one_line_error(excinfo, f"pid {process.pid}")
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
        process.stdout.close()
    with claim(tmp_path, {"lr": 0.01}) as w:
        assert w.resumed


def test_other_processes_of_a_multi_host_run_neither_lock_nor_write(tmp_path):
    run = tmp_path / "run"
    follower = claim(run, primary=False)
    follower.write_json("summary.json", {"a": 1})
    follower.append_lines("metrics.jsonl", ROWS)
    follower.clear()
    assert not run.exists() and follower.folder("checkpoints") == str(run / "checkpoints")
    with claim(run) as w:  # the primary is not blocked by the others
        w.append_lines("metrics.jsonl", ROWS)
        assert claim(run, primary=False).read_lines("metrics.jsonl") == ROWS


def failing(error: int, after: int = 0):
    """A stand-in for an os function that works `after` times, then fails with `error`."""
    calls = []

    def fail(fd, data=None):
        calls.append(fd)
        if len(calls) > after:
            raise OSError(error, os.strerror(error))
        return REAL_WRITE(fd, data[: len(data) // 2]) if data is not None else REAL_FSYNC(fd)

    return fail


REAL_WRITE, REAL_FSYNC = os.write, os.fsync


def refuse(error: int):
    def fail(*args, **kwargs):
        raise OSError(error, os.strerror(error))

    return fail


@pytest.mark.parametrize(
    "target, error, fake",
    [
        ("write", errno.ENOSPC, lambda: failing(errno.ENOSPC, after=1)),  # half, then full
        ("fsync", errno.EDQUOT, lambda: failing(errno.EDQUOT)),
        ("open", errno.EACCES, lambda: refuse(errno.EACCES)),
        ("open", errno.EROFS, lambda: refuse(errno.EROFS)),
    ],
    ids=["disk-full", "quota", "permission", "read-only"],
)
def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp_file(
    tmp_path, monkeypatch, target, error, fake
):
    with claim(tmp_path) as w:
        w.write_json("summary.json", {"old": True})
        w.append_lines("metrics.jsonl", ROWS)
        before = tree(tmp_path)
        for write in (
            lambda: w.write_json("summary.json", {"new": True}),
            lambda: w.append_lines("metrics.jsonl", [{"round": 3, "accuracy": 0.75}] * 50),
            lambda: w.write_text("plots/new.csv", "a,b\n"),
        ):
            with monkeypatch.context() as patch, pytest.raises(WorkdirError) as excinfo:
                patch.setattr(os, target, fake())
                write()
            one_line_error(excinfo, str(tmp_path), os.strerror(error))
        assert tree(tmp_path) == before
        assert w.read_lines("metrics.jsonl") == ROWS


def test_a_workdir_that_cannot_be_created_or_locked_is_named(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "mkdir", refuse(errno.EACCES))
    with pytest.raises(WorkdirError) as excinfo:
        claim(tmp_path / "a" / "b")
    one_line_error(excinfo, str(tmp_path / "a" / "b"), "Permission denied")
    monkeypatch.undo()
    monkeypatch.setattr(workdir, "open", refuse(errno.EROFS), raising=False)
    with pytest.raises(WorkdirError) as excinfo:
        claim(tmp_path)
    one_line_error(excinfo, str(tmp_path), "Read-only file system")


def test_a_file_where_a_folder_should_be_is_an_error_not_a_traceback(tmp_path):
    with claim(tmp_path) as w:
        w.write_text("summary.json", "{}")
        with pytest.raises(WorkdirError) as excinfo:
            w.write_text("summary.json/x", "")
        one_line_error(excinfo, "summary.json")
    with claim(tmp_path, {**CONFIG, "lr": 0.1}, overwrite=True):  # deletes it all the same
        assert sorted(os.listdir(tmp_path)) == sorted([LOCK, MARKER])


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640)], ids=["022", "027"])
def test_written_files_are_readable_as_the_umask_allows(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        with claim(tmp_path) as w:
            w.write_json("summary.json", {})
            w.append_lines("metrics.jsonl", ROWS)
            w.write_bytes("features/a.npz", b"x")
    finally:
        os.umask(old)
    for name in ("summary.json", "metrics.jsonl", "features/a.npz", MARKER):
        assert os.stat(tmp_path / name).st_mode & 0o777 == mode, name


def test_numpy_values_and_nan_are_written_as_json(tmp_path):
    with claim(tmp_path) as w:
        w.append_lines("m.jsonl", [{"acc": np.float32(0.5), "c": np.arange(2), "x": np.nan}])
        w.write_json("s.json", {"inf": float("inf"), "n": np.int64(3)})
        assert w.read_lines("m.jsonl") == [{"acc": 0.5, "c": [0, 1], "x": None}]
    assert json.loads((tmp_path / "s.json").read_text()) == {"inf": None, "n": 3}


def test_a_torn_last_line_is_dropped(tmp_path):
    with claim(tmp_path) as w:
        w.append_lines("metrics.jsonl", ROWS)
        with open(tmp_path / "metrics.jsonl", "ab") as f:
            f.write('{"round": 3, "name": "é'.encode()[:-1])  # cut inside a character
        assert w.read_lines("metrics.jsonl") == ROWS
        torn = (tmp_path / "metrics.jsonl").read_bytes()
        with pytest.raises(WorkdirError) as excinfo:  # a row after it would make it unreadable
            w.append_lines("metrics.jsonl", ROWS)
        one_line_error(excinfo, "metrics.jsonl")
        assert (tmp_path / "metrics.jsonl").read_bytes() == torn
        assert w.truncate_lines("metrics.jsonl", lambda row: row["round"] <= 1) == 1
        w.append_lines("metrics.jsonl", ROWS[1:])
        assert w.read_lines("metrics.jsonl") == ROWS


@pytest.mark.parametrize(
    "damage, line",
    [
        (lambda rows: rows[:1] + [b'{"round": 2, "accur'] + rows[1:], 2),  # torn in the middle
        (lambda rows: rows + [os.urandom(64) + b"\xff"], 3),  # random bytes appended
        (lambda rows: rows + [b"\xff\xfe garbage"], 3),  # not UTF-8, no newline
        (lambda rows: rows[:1] + [b"[1, 2]\n"] + rows[1:], 2),  # not an object
        (lambda rows: rows + [b"[1, 2]"], 3),  # not an object, last and without its newline
        (lambda rows: rows[:1] + [b"\n"] + rows[1:], 2),  # blank line
        (lambda rows: rows + [b"[" * 100_000 + b"\n"], 3),  # nested beyond the parser
    ],
)
def test_a_damaged_line_is_named_and_the_file_left_as_it_is(tmp_path, damage, line):
    rows = [json.dumps(r).encode() + b"\n" for r in ROWS]
    data = b"".join(damage(rows))
    with claim(tmp_path) as w:
        (tmp_path / "metrics.jsonl").write_bytes(data)
        for read in (
            lambda: w.read_lines("metrics.jsonl"),
            lambda: w.truncate_lines("metrics.jsonl", lambda row: row["round"] <= 1),
        ):
            with pytest.raises(WorkdirError) as excinfo:
                read()
            one_line_error(excinfo, "metrics.jsonl", f"line {line} ")
            assert (tmp_path / "metrics.jsonl").read_bytes() == data


def test_workdir_overwrite_keeps_a_users_files_in_the_runs_writer_folders(tmp_path):
    with claim(tmp_path) as w:
        write_run(w)
        events = os.path.join(w.folder("tensorboard"), "e0000_fedavg")
        os.makedirs(events)
        with open(os.path.join(events, "events.out.tfevents.1.host"), "wb") as f:
            f.write(b"events")
        w.own("tensorboard/e0000_fedavg/events.out.tfevents.1.host", workdir.FILE)
    (tmp_path / "checkpoints" / "notes.txt").write_text("mine")
    (tmp_path / "tensorboard" / "e0000_fedavg" / "mine.txt").write_text("mine too")
    with claim(tmp_path, {**CONFIG, "lr": 0.1}, overwrite=True) as w:
        assert not w.resumed
        w.folder("checkpoints")  # the next run uses the folder that stayed
    assert tree(tmp_path) == {
        "checkpoints/notes.txt": b"mine",
        "tensorboard/e0000_fedavg/mine.txt": b"mine too",
        MARKER: (tmp_path / MARKER).read_bytes(),
    }


def test_workdir_own_forgets_what_its_writer_deleted(tmp_path):
    with claim(tmp_path) as w:
        w.folder("checkpoints")
        for step in (2, 4, 6):
            w.own(f"checkpoints/{step}")
            os.makedirs(tmp_path / "checkpoints" / str(step))
            if step == 4:  # orbax keeps the last two
                os.rmdir(tmp_path / "checkpoints" / "2")
        with pytest.raises(ValueError, match="not inside a folder"):
            w.own("metrics.jsonl")
    paths = json.loads((tmp_path / MARKER).read_text())["paths"]
    assert paths == {"checkpoints": "handed", "checkpoints/4": "owned", "checkpoints/6": "owned"}


def test_workdir_holding_only_a_users_lock_file_is_foreign(tmp_path):
    (tmp_path / LOCK).write_text("my lock, not a run's")
    with pytest.raises(WorkdirError) as excinfo:
        claim(tmp_path)
    one_line_error(excinfo, LOCK, "nothing was deleted")
    assert os.listdir(tmp_path) == [LOCK]
    assert (tmp_path / LOCK).read_text() == "my lock, not a run's"


def test_workdir_left_with_only_the_tools_lock_is_claimed(tmp_path):
    with claim(tmp_path / "run"):
        pass
    os.remove(tmp_path / "run" / MARKER)  # a run stopped between its lock and its marker
    with claim(tmp_path / "run") as w:
        assert not w.resumed


def test_workdir_tilde_is_the_home_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    with claim("~/runs/a") as w:
        assert w.path == str(tmp_path / "runs" / "a")
    assert not (tmp_path / "~").exists()


def test_workdir_a_dangling_symlink_is_named_as_one(tmp_path):
    os.symlink(tmp_path / "gone", tmp_path / "run")
    with pytest.raises(WorkdirError) as excinfo:
        claim(tmp_path / "run")
    one_line_error(excinfo, "symbolic link", str(tmp_path / "gone"), "does not exist")


@pytest.mark.slow  # a whole run
def test_workdir_overwrite_of_a_real_run_deletes_its_checkpoints_and_events_only(tmp_path):
    c = tiny_config(num_rounds=2, checkpoint_every=2, tensorboard=True)
    train.train_and_evaluate(c, str(tmp_path))
    events = [d for d in os.listdir(tmp_path / "tensorboard")]
    (tmp_path / "checkpoints" / "notes.txt").write_text("mine")
    (tmp_path / "tensorboard" / events[0] / "mine.txt").write_text("mine too")
    c.lr, c.overwrite = c.lr / 2, True
    train.train_and_evaluate(c, str(tmp_path))
    assert (tmp_path / "checkpoints" / "notes.txt").read_text() == "mine"
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2", "notes.txt"]
    assert (tmp_path / "tensorboard" / events[0] / "mine.txt").read_text() == "mine too"
    kept = os.listdir(tmp_path / "tensorboard" / events[0])
    assert len([n for n in kept if n.startswith("events.out")]) == 1  # the new run's alone


@pytest.mark.slow  # the quick tier leaves launches and large compiles out
def test_workdir_report_out_writes_only_into_a_folder_of_its_own(tmp_path, capsys, monkeypatch):
    write_workdir(tmp_path / "run")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "results.md").write_text("my notes")
    assert report.main([str(tmp_path / "run"), f"--out={mine}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "results.md" in err and "nothing was deleted" in err
    assert os.listdir(mine) == ["results.md"] and (mine / "results.md").read_text() == "my notes"
    out = tmp_path / "out"
    for _ in range(2):  # a new folder, then the same folder again: it made it
        assert report.main([str(tmp_path / "run"), f"--out={out}"]) == 0
    assert json.loads((out / MARKER).read_text())["paths"]["results.md"] == "file"
    assert report.main([str(tmp_path / "run"), f"--out={tmp_path / 'run'}"]) == 0  # in place
    claim(tmp_path / "real").release()
    write_workdir(tmp_path / "real")
    assert report.main([str(tmp_path / "run"), f"--out={tmp_path / 'real'}"]) == 2
    assert "not a report folder" in capsys.readouterr().err
    monkeypatch.setenv("HOME", str(tmp_path))
    assert report.main(["~/run", "--out=~/home_out"]) == 0
    assert (tmp_path / "home_out" / "results.md").exists()


def _missing_data_config(tmp_path):
    from fedjax_poison.config import configuration

    c = configuration.smoke(configuration.paper_config("cifar10"))
    c.data.source, c.data.dir = "files", str(tmp_path / "no_data_here")
    return c


def test_workdir_of_a_run_refused_for_missing_data_is_left_behind_by_nobody(tmp_path):
    with pytest.raises(errors.UserError):
        train.train_and_evaluate(_missing_data_config(tmp_path), str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()  # no marker, lock or folder left
    (tmp_path / "mine").mkdir()  # a folder the user made stays, empty as it was
    with pytest.raises(errors.UserError):
        train.train_and_evaluate(_missing_data_config(tmp_path), str(tmp_path / "mine"))
    assert (tmp_path / "mine").is_dir() and not os.listdir(tmp_path / "mine")
