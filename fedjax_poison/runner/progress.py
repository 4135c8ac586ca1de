"""What a run says on the terminal: compiling, one line per evaluation, where the results are.

Lines go to the `fedjax_poison` logger. In a sweep, the progress line summarises all the
experiments of the group (min / mean / max), not the first one.
"""

import logging
import math
import time
from collections.abc import Callable, Sequence

log = logging.getLogger("fedjax_poison")


def duration(seconds: float) -> str:
    """'1h02m', '3m05s', '?' for an unknown time."""
    if not math.isfinite(seconds):
        return "?"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def spread(values: Sequence) -> str:
    """'0.871' for one value, 'mean 0.871 [0.850-0.880]' for several; NaN and None left out."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return "-"
    if len(values) == 1:
        return f"{finite[0]:.3f}"
    mean = sum(finite) / len(finite)
    return f"{mean:.3f} [{min(finite):.3f}-{max(finite):.3f}]"


class Progress:
    """Progress lines of one run; `clock` and `emit` are injectable (tests)."""

    def __init__(
        self,
        total_rounds: int,
        num_groups: int,
        *,
        clock: Callable[[], float] = time.monotonic,
        emit: Callable[[str], None] = log.info,
    ):
        self.total_rounds, self.num_groups = total_rounds, num_groups
        self.clock, self.emit = clock, emit
        self.started, self.rounds_at_start = clock(), 0

    def compiling(self, experiments: int, clients: int) -> None:
        self.emit(f"compiling the round ({experiments} experiment(s) x {clients} clients)...")

    def compiled(self, seconds: float) -> None:
        self.emit(f"compiled in {seconds:.1f} s")

    def resumed(self, group: int, round_done: int) -> None:
        where = f" of experiment group {group + 1}/{self.num_groups}" if self.num_groups > 1 else ""
        self.emit(f"resuming after round {round_done}{where}")

    def start(self, rounds_done: int) -> None:
        """Training starts (after compiling) with `rounds_done` rounds already done."""
        self.started, self.rounds_at_start = self.clock(), rounds_done

    def update(self, rounds_done: int, group: int, round_done: int, rows: Sequence[dict]) -> str:
        """One line after an evaluation; rounds_done counts rounds over all groups."""
        elapsed = self.clock() - self.started
        rate = (rounds_done - self.rounds_at_start) / elapsed if elapsed > 0 else float("nan")
        eta = (self.total_rounds - rounds_done) / rate if rate > 0 else float("nan")
        groups = f" group {group + 1}/{self.num_groups}" if self.num_groups > 1 else ""
        parts = [f"round {round_done}/{self.total_rounds // self.num_groups}{groups}"]
        parts.append(f"acc {spread([r.get('accuracy') for r in rows])}")
        for key, name in (("source_recall", "source recall"), ("attack_success_rate", "ASR")):
            values = [r.get(key) for r in rows]
            if any(v is not None and math.isfinite(v) for v in values):
                parts.append(f"{name} {spread(values)}")
        diverged = sum(bool(r.get("diverged")) for r in rows)
        if diverged:
            parts.append(f"{diverged} diverged")
        speed = f"{rate:.2f} rounds/s" if math.isfinite(rate) else "- rounds/s"
        if len(rows) > 1 and math.isfinite(rate):  # a sweep: each round is len(rows) rounds
            speed += f" ({rate * len(rows):.2f} experiment-rounds/s)"
        line = " | ".join(parts) + f" | {speed} | ETA {duration(eta)}"
        self.emit(line)
        return line

    def finished(self, workdir: str, files: Sequence[str]) -> None:
        self.emit(f"results in {workdir}: " + ", ".join(files))
