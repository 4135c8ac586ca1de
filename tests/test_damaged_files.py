"""Damaged files, for every reader: a checkpoint is checked against its digests before a
resume uses it, and a damaged one is named in one line, never resumed from."""

import json
import logging
import os

import pytest
from test_cli import TINY, launch, one_line_error
from test_report import write_workdir
from test_simulation import tiny_config

from fedjax_poison import report
from fedjax_poison.runner import checkpoint, train


def finished_run(path) -> list[str]:
    """A run with checkpoints 2 and 4; its metrics lines."""
    train.train_and_evaluate(tiny_config(num_rounds=4, checkpoint_every=2), str(path))
    return (path / "metrics.jsonl").read_text().splitlines()


def array_file(path, step: int) -> str:
    """The largest array file of checkpoint `step`."""
    arrays = path / "checkpoints" / str(step) / "arrays"
    found = [os.path.join(r, n) for r, _, names in os.walk(arrays) for n in names]
    return max(found, key=os.path.getsize)


def flip(path: str, count: int = 16) -> None:
    data = bytearray(open(path, "rb").read())
    for i in range(count):
        data[len(data) // 2 + i] ^= 0xFF
    with open(path, "wb") as f:
        f.write(data)


@pytest.mark.slow  # a whole run
def test_damaged_files_flipped_bytes_resume_from_the_checkpoint_before(tmp_path, caplog):
    lines = finished_run(tmp_path)
    damaged = array_file(tmp_path, 4)
    flip(damaged)
    with caplog.at_level(logging.WARNING):
        summary = train.train_and_evaluate(
            tiny_config(num_rounds=4, checkpoint_every=2), str(tmp_path)
        )
    warnings = [r.getMessage() for r in caplog.records if "damaged" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert os.path.relpath(damaged, tmp_path / "checkpoints") in warnings[0]
    assert "resuming from checkpoint 2" in warnings[0]
    # Rounds 3 and 4 were computed again from checkpoint 2: the same rows as before.
    assert (tmp_path / "metrics.jsonl").read_text().splitlines() == lines
    assert summary["final"][0] == json.loads(lines[-1])
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2", "4"]  # 4 saved again, intact
    assert checkpoint.Checkpoints(str(tmp_path / "checkpoints"), 4).latest()["round"] == 4


@pytest.mark.slow  # a whole run
def test_damaged_files_with_no_intact_checkpoint_left_are_refused_in_one_line(tmp_path):
    finished_run(tmp_path)
    flip(array_file(tmp_path, 4), count=1)
    os.remove(array_file(tmp_path, 2))
    checkpoints = checkpoint.Checkpoints(str(tmp_path / "checkpoints"), 4)
    with pytest.raises(checkpoint.CheckpointError) as caught:
        checkpoints.latest()
    checkpoints.close()
    message = str(caught.value)
    assert "\n" not in message and "checkpoint 4" in message
    assert "changed since it was written" in message and "no intact checkpoint" in message
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2", "4"]  # nothing deleted


@pytest.mark.slow  # a whole run
def test_damaged_files_a_deleted_shard_is_one_line_and_status_2(tmp_path):
    work = str(tmp_path / "run")
    args = [*TINY, "--config.num_rounds=2", "--config.eval_every=2", f"--workdir={work}"]
    assert launch(*args).returncode == 0
    shard = array_file(tmp_path / "run", 2)
    os.remove(shard)
    line = one_line_error(launch(*args))
    assert os.path.relpath(shard, os.path.join(work, "checkpoints")) in line
    assert "is missing" in line


def damage_text(name: str, text: str):
    return lambda path: (path / name).write_text(text)


def cut_last_line(path):
    lines = (path / "metrics.jsonl").read_text().splitlines(keepends=True)
    (path / "metrics.jsonl").write_text("".join(lines[:-1]) + '{"round": 20, "accuracy": 0.5x\n')


def round_abc(path):
    lines = (path / "metrics.jsonl").read_text().splitlines(keepends=True)
    lines[0] = json.dumps({**json.loads(lines[0]), "round": "abc"}) + "\n"
    (path / "metrics.jsonl").write_text("".join(lines))


REPORT_DAMAGE = {
    "metrics_missing": (lambda path: os.remove(path / "metrics.jsonl"), "no metrics.jsonl"),
    "metrics_last_line": (cut_last_line, "metrics.jsonl line 8 is not JSON"),
    "metrics_round_abc": (round_abc, "metrics.jsonl line 1: round is 'abc'"),
    "experiments_not_objects": (damage_text("experiments.json", "[1,2,3]"), "experiments.json"),
    "config_wrong_types": (
        damage_text("config.json", '{"num_rounds": "20", "eval_every": 5}'),
        "config.json num_rounds is '20'",
    ),
    "config_a_list": (damage_text("config.json", "[1]"), "config.json holds a JSON list"),
    "records_empty": (damage_text("records/r00001_e0000.npz", ""), "r00001_e0000.npz is empty"),
    "records_corrupt": (
        damage_text("records/r00001_e0000.npz", "PK\x03\x04 cut"),
        "r00001_e0000.npz cannot be read",
    ),
}


@pytest.mark.parametrize("case", sorted(REPORT_DAMAGE))
@pytest.mark.slow  # the quick tier leaves launches and large compiles out
def test_damaged_files_report_refuses_and_keeps_the_good_tables(tmp_path, capsys, case):
    write_workdir(tmp_path)
    assert report.main([str(tmp_path)]) == 0
    good = {n: (tmp_path / n).read_bytes() for n in ("results.csv", "results.md")}
    capsys.readouterr()
    damage, words = REPORT_DAMAGE[case]
    damage(tmp_path)
    assert report.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and words in err, err
    assert {n: (tmp_path / n).read_bytes() for n in good} == good


@pytest.mark.slow  # a whole run
def test_interruption_between_a_checkpoint_and_its_digests_resumes_from_the_one_before(
    tmp_path, caplog
):
    lines = finished_run(tmp_path)
    os.remove(tmp_path / "checkpoints" / "4" / checkpoint.DIGESTS)  # killed just after orbax
    with caplog.at_level(logging.WARNING):
        train.train_and_evaluate(tiny_config(num_rounds=4, checkpoint_every=2), str(tmp_path))
    (warning,) = [r.getMessage() for r in caplog.records if "damaged" in r.getMessage()]
    assert "stopped as it saved" in warning and "resuming from checkpoint 2" in warning
    assert (tmp_path / "metrics.jsonl").read_text().splitlines() == lines
