"""The report rebuilt from a workdir's files alone: new, older and interrupted runs, the
command line, and several runs side by side."""

import csv
import json
import os
import stat

import numpy as np
import pytest

from fedjax_poison import report as command
from fedjax_poison.results import report, tables
from fedjax_poison.runner import workdir

CONFIG = {
    "dataset": "fashion_mnist",
    "num_clients": 50,
    "clients_per_round": 5,
    "num_rounds": 20,
    "eval_every": 5,
    "seed": 0,
    "data": {"source": "auto"},
    "attack": {"name": "label_flip", "malicious_fraction": 0.5, "flips": "6:0"},
    "defense": {"name": "fedavg"},
    "selection": {"schedule": "always", "breakpoint": 75, "alpha": 0.5, "alpha_after": -1},
}
# Source recall after rounds 5, 10, 15, 20 of the clean (0) and attacked (1) experiment.
SOURCE = {0: (0.7, 0.8, 0.9, 0.9), 1: (0.6, 0.5, 0.2, 0.4)}


def entry(e, fraction, twin):
    return {
        "experiment": e,
        "label": f"malicious_fraction={fraction}",
        "axes": {"malicious_fraction": fraction},
        "malicious_fraction": fraction,
        "flips": "6:0",
        "seed": 0,
        "schedule": "always",
        "alpha": [0.5, 0.5],
        "breakpoint": 75,
        "attack": "label_flip",
        "defense": "fedavg",
        "measure": "flip" if fraction else "none",
        "backdoor_target": -1,
        "clean_twin": twin,
        "malicious_clients": [] if not fraction else list(range(25)),
    }


def metrics_row(e, round_, source):
    recall = [0.9] * 10
    recall[6] = source
    return {
        "round": round_,
        "experiment": e,
        "accuracy": 0.85 - 0.05 * e,
        "recall": recall,
        "precision": [0.9] * 10,
        "source_recall": source,
        "target_precision": 0.7,
        "attack_success_rate": 1 - source,
        "loss": 0.4,
        "malicious_selected": e,
        "poisoned_selected": e,
        "degenerate_rounds": 0,
        "diverged": False,
    }


def write_workdir(path, *, new=True, summary=True, records=True, config=CONFIG, clean=True):
    """A run of a clean and an attacked experiment as the run loop writes it (or, with
    new=False, as older runs did: malicious.json and axes in the rows; clean=False: the
    attacked experiment alone)."""
    os.makedirs(path, exist_ok=True)
    dump = lambda name, obj: open(os.path.join(path, name), "w").write(json.dumps(obj))
    dump("config.json", config)
    if new:
        dump("experiments.json", [entry(0, 0.0, None), entry(1, 0.5, 0)])
    else:
        dump(
            "malicious.json",
            [{"experiment": e, "malicious_fraction": f} for e, f in ((0, 0.0), (1, 0.5))],
        )
    rows = [metrics_row(e, 5 * (i + 1), s[i]) for i in range(4) for e, s in SOURCE.items()]
    if not new:
        rows = [{**r, "malicious_fraction": 0.5 * r["experiment"]} for r in rows]
    if not clean:
        dump("experiments.json", [{**entry(1, 0.5, None), "experiment": 0}])
        rows = [{**r, "experiment": 0} for r in rows if r["experiment"] == 1]
    with open(os.path.join(path, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    if summary:
        dump("summary.json", {"num_rounds": 20, "num_experiments": 2, "data_source": "synthetic"})
    if records:
        os.makedirs(os.path.join(path, "records"))
        malicious = np.zeros((2, 5, 5), bool)
        malicious[1, [1, 3], 0] = True  # experiment 1: a malicious client in rounds 2 and 4
        np.savez(
            os.path.join(path, "records", "r00001_e0000.npz"),
            experiment=np.arange(2) if clean else np.asarray([1, 0]),
            round=np.arange(1, 6),
            malicious=malicious,
        )


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_write_report_reads_the_workdir_and_writes_through_the_writer(tmp_path):
    write_workdir(tmp_path)

    class Writer:
        files = {}

        def write_text(self, name, text):
            self.files[name] = text.encode()

        def write_bytes(self, name, data):
            self.files[name] = data

    writer = Writer()
    names = report.write_report(str(tmp_path), writer)
    assert set(names) == set(writer.files)
    assert {"results.csv", "results.md", "curves.png", "curves.pdf"} <= set(names)
    assert not (tmp_path / "results.csv").exists()  # everything went through the writer
    md = writer.files["results.md"].decode()
    assert "data source used: synthetic (config: data.source=auto)" in md


def test_stable_measures_and_loss_from_the_files(tmp_path):
    write_workdir(tmp_path)
    table = tables.experiment_table(report.read_run(str(tmp_path), window=2))
    # last two evaluations (rounds 15, 20): attacked (0.2 + 0.4) / 2; loss
    # ((0.9 - 0.2) + (0.9 - 0.4)) / 2; final round 0.4
    assert table[1]["source_recall"] == pytest.approx(0.3)
    assert table[1]["source_recall_loss"] == pytest.approx(0.6)
    assert table[1]["source_recall_final"] == pytest.approx(0.4)
    assert table[1]["window"] == 2 and table[1]["clean_twin"] == 0


def test_files_are_replaced_whole_and_readable_by_all(tmp_path):
    writer = report.FolderWriter(str(tmp_path / "new"))
    writer.write_text("results.csv", "a\n")
    writer.write_text("results.csv", "b\n")
    assert (tmp_path / "new" / "results.csv").read_text() == "b\n"
    assert os.listdir(tmp_path / "new") == ["results.csv"]  # no temporary file left
    assert stat.S_IMODE(os.stat(tmp_path / "new" / "results.csv").st_mode) == 0o644


def test_window_from_the_config(tmp_path):
    write_workdir(tmp_path, config={**CONFIG, "eval_window": 3})
    run = report.read_run(str(tmp_path))
    assert run.window == 3
    assert report.read_run(str(tmp_path), window=1).window == 1


def test_an_older_run_without_experiments_json(tmp_path):
    write_workdir(tmp_path, new=False, summary=False, records=False)
    run = report.read_run(str(tmp_path))
    assert [e["malicious_fraction"] for e in run.experiments] == [0.0, 0.5]
    assert run.experiments[1]["clean_twin"] == 0 and run.experiments[1]["measure"] == "flip"
    assert run.experiments[1]["flips"] == "6:0"  # from the config
    assert run.data_source == "auto" and run.selections == {}
    table = tables.experiment_table(run)
    assert table[1]["source_recall_loss"] == pytest.approx(0.9 - 0.4)  # W = 1


def test_an_interrupted_run(tmp_path):
    write_workdir(tmp_path, summary=False)
    path = tmp_path / "metrics.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:5]) + lines[5][:30])  # killed while writing round 15
    run = report.read_run(str(tmp_path))
    assert [len(r) for r in run.rows] == [3, 2]
    tables.write_tables(run, report.FolderWriter(str(tmp_path)))
    rows = read_csv(tmp_path / "results.csv")
    assert rows[1]["rounds_done"] == "10" and float(rows[1]["source_recall"]) == 0.5
    assert "the run stopped after round 15" in (tmp_path / "results.md").read_text()


def test_divergence_named_only_in_the_summary_still_empties_the_cells(tmp_path):
    write_workdir(tmp_path)
    summary = {"data_source": "files", "diverged": [{"experiment": 1, "round": 12}]}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    run = report.read_run(str(tmp_path))
    table = tables.experiment_table(run)
    assert table[1]["diverged"] == 12 and np.isnan(table[1]["source_recall"])
    assert run.data_source == "files"


def test_selections_come_from_the_records(tmp_path):
    write_workdir(tmp_path)
    assert report.read_selections(str(tmp_path)) == {0: [], 1: [2, 4]}
    (tmp_path / "records" / "r00006_e0000.npz").write_bytes(b"cut off")
    assert report.read_selections(str(tmp_path)) == {0: [], 1: [2, 4]}


def test_command_line_with_several_workdirs(tmp_path, capsys, monkeypatch):
    write_workdir(tmp_path / "a", clean=False)
    write_workdir(tmp_path / "b", clean=False)
    out = tmp_path / "out"
    assert command.main([str(tmp_path / "a"), str(tmp_path / "b"), f"--out={out}"]) == 0
    for name in ("a/results.csv", "b/curves.pdf", "combined_results.csv", "combined_curves.png"):
        assert (out / name).stat().st_size > 0, name
    combined = read_csv(out / "combined_results.csv")
    assert [r["run"] for r in combined] == ["a", "b"]
    printed = capsys.readouterr().out
    assert f"{out}/a: results.csv" in printed and f"{out}: combined_results.csv" in printed
    assert not (tmp_path / "a" / "results.csv").exists()
    # Without --out each workdir is rebuilt in place, and nothing lands in the current folder.
    monkeypatch.chdir(tmp_path / "out")
    before = sorted(os.listdir("."))
    assert command.main([str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    assert sorted(os.listdir(".")) == before and (tmp_path / "a" / "results.csv").exists()
    assert "add --out=FOLDER" in capsys.readouterr().out


def test_command_line_errors_are_one_line(tmp_path, capsys):
    assert command.main([str(tmp_path / "missing")]) == 2
    assert "holds no run" in capsys.readouterr().err
    write_workdir(tmp_path / "a")
    assert command.main([str(tmp_path / "a"), "--window=0"]) == 2


def test_a_run_workdir_lists_the_report_in_its_manifest(tmp_path):
    claimed = workdir.Workdir.claim(str(tmp_path), CONFIG, overwrite=False)
    claimed.release()
    write_workdir(tmp_path, clean=False)
    assert command.main([str(tmp_path)]) == 0
    marker = json.loads((tmp_path / workdir.MARKER).read_text())
    assert marker["paths"]["results.csv"] == "file" and marker["paths"]["curves.png"] == "file"


def test_ctrl_c_in_the_report_command_is_one_line_and_status_130(tmp_path, monkeypatch, capsys):
    write_workdir(tmp_path / "run")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(command, "write_run", interrupted)
    assert command.main([str(tmp_path / "run")]) == 130
    err = capsys.readouterr().err
    assert err == "error: interrupted: the files written so far are whole\n"
