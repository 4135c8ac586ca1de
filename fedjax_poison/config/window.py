"""The stable window: how many of a run's last evaluations its stable measures average.

A final round's value swings with chance; a *stable* measure is the mean over the last W
evaluations of an experiment instead, W = `eval_window` of the config, or by default the
evaluations that fall in the last 10% of the rounds (at least one). The one definition
every file shares: the run's metrics rows and summary, the tables and the matrix.
"""

from collections.abc import Mapping, Sequence

AUTO_SHARE = 0.1  # the default window covers this share of the last rounds


def evaluation_rounds(num_rounds: int, eval_every: int) -> list[int]:
    """The rounds after which a run evaluates: every eval_every-th one, and the last."""
    rounds = list(range(eval_every, num_rounds + 1, eval_every))
    return rounds if rounds and rounds[-1] == num_rounds else [*rounds, num_rounds]


def auto_window(rounds: Sequence[int], num_rounds: int) -> int:
    """How many of the evaluation `rounds` fall in the last 10% of num_rounds (at least 1)."""
    return max(1, sum(1 for r in rounds if 10 * r > 9 * num_rounds))


def window_size(config: Mapping, observed: Sequence[int], override: int | None = None) -> int:
    """W: `override`, else the config's eval_window (> 0), else auto_window.

    The evaluation rounds come from the config's num_rounds and eval_every, or from the
    `observed` rounds of the metrics when the config lacks them.
    """
    if override:
        return int(override)
    if int(config.get("eval_window") or 0) > 0:
        return int(config["eval_window"])
    num_rounds = config.get("num_rounds") or max(observed, default=1)
    every = config.get("eval_every")
    rounds = evaluation_rounds(num_rounds, every) if every else sorted(set(observed))
    return auto_window(rounds, num_rounds)
