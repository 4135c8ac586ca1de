"""The terminal lines of a run, with time injected instead of slept."""

from fedjax_poison.runner.progress import Progress, duration, spread


def test_a_sweep_line_summarises_every_experiment():
    now, lines = [100.0], []
    progress = Progress(40, 2, clock=lambda: now[0], emit=lines.append)
    progress.start(0)
    now[0] = 110.0  # 10 rounds in 10 s
    rows = [
        {"accuracy": 0.8, "source_recall": 0.5, "attack_success_rate": None},
        {"accuracy": 0.9, "source_recall": 0.1, "diverged": True},
    ]
    line = progress.update(10, 0, 10, rows)
    assert line == (
        "round 10/20 group 1/2 | acc 0.850 [0.800-0.900] | source recall 0.300 [0.100-0.500]"
        " | 1 diverged | 1.00 rounds/s (2.00 experiment-rounds/s) | ETA 0m30s"
    )
    assert lines == [line]


def test_a_single_run_line_and_a_resumed_start():
    now, lines = [0.0], []
    progress = Progress(200, 1, clock=lambda: now[0], emit=lines.append)
    progress.start(150)  # resumed after round 150: its rate counts this launch's rounds only
    now[0] = 25.0
    line = progress.update(200, 0, 200, [{"accuracy": 0.87, "source_recall": float("nan")}])
    assert line == "round 200/200 | acc 0.870 | 2.00 rounds/s | ETA 0m00s"


def test_durations_and_spreads():
    assert duration(3725) == "1h02m" and duration(65) == "1m05s"
    assert duration(float("inf")) == "?"
    assert spread([None, float("nan")]) == "-"
    assert spread([0.25]) == "0.250"
