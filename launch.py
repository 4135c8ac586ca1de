"""Runs one experiment or one sweep of fedjax-poison from a config file.

    python launch.py --config=configs/fashion_mnist.py [--workdir=DIR] [--config.FIELD=VALUE ...]

Without --workdir the run goes to runs/<config name>/<date-time>. Any config field can be
overridden: --config.num_rounds=30 --config.attack.flips='6:0'. A bad value or field ends
in one line naming it (exit status 2). Ctrl-C or SIGTERM, at any moment, stops the run at
the next safe point, saves it and prints the command that resumes it (exit status 130; a
second Ctrl-C stops at once, from the last checkpoint). This is the only place flags are
read.
"""

from fedjax_poison import signals

# First of all, before JAX loads: a signal from now on is a request to stop (signals.py).
STOP = signals.catch() if __name__ == "__main__" else None

import logging  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

import fedjax_poison  # noqa: E402
from fedjax_poison.errors import UserError  # noqa: E402
from fedjax_poison.round import sharding  # noqa: E402
from fedjax_poison.runner import api, train  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (a get_config).")
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Where the run writes its files; default runs/<config name>/<date-time>."
)
flags.mark_flags_as_required(["config"])


def fail(message: str, status: int = 2) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(status)


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with every mistake (a bad value, a field the config does not
    have) in one line instead of a traceback."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        fail(_flag_error(e))
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        fail(_override_error(e, argv))


def _flag_error(e: Exception) -> str:
    """absl's flag error as one line: a config file's own complaint without its traceback."""
    text = str(e)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if "Traceback" in text and lines:
        found = re.match(r"(?:[\w.]+\.)?\w+: (.*)", lines[-1])
        return found.group(1) if found else lines[-1]
    return " ".join(text.split())


def _override_error(e: Exception, argv: list[str]) -> str:
    """ml_collections' complaint about an override, as one line naming the flag."""
    if isinstance(e, UserError):  # raised by the config file itself
        return str(e)
    text = str(e).replace("\\n", " ").replace("\\'", "'")
    close = re.search(r'Did you mean "([\w.]+)" instead of "([\w.]+)"', text)
    quoted = re.findall(r"'([\w.]+)'", text)
    overrides = [a[2:].split("=", 1)[0] for a in argv if a.startswith("--config.")]
    for flag in overrides:
        parent, _, last = flag.rpartition(".")
        if close and last == close.group(2):
            field = ".".join(parent.split(".")[1:] + [close.group(1)])
            return f"--{flag} is not a config field (did you mean {field}?)"
        if last in quoted:
            return f"--{flag} is not a config field"
    return "--config: " + " ".join(text.split())


def config_name(path: str) -> str:
    """'configs/paper/label_flipping.py:dataset=cifar10' -> 'label_flipping_dataset=cifar10'."""
    file, _, arg = path.partition(":")
    name = os.path.splitext(os.path.basename(file))[0]
    return f"{name}_{arg.replace(',', '_')}" if arg else name


def resume_command(workdir: str) -> str:
    """The command line of this launch, with --workdir set: it resumes the run."""
    args = [a for a in sys.argv[1:] if not a.startswith("--workdir")]
    return shlex.join([sys.executable, sys.argv[0], *args, f"--workdir={workdir}"])


def stopped(message: str, workdir: str | None) -> None:
    """Ends a stopped launch: one line, the command that resumes it if a workdir holds the
    run, status 130."""
    if workdir is None:
        fail(message, signals.STATUS)
    fail(f"{message}; resume with:\n  {resume_command(workdir)}", signals.STATUS)


def main(argv):
    if STOP is not None and STOP.is_set():  # while loading or reading the flags
        stopped("interrupted before the run started: nothing was written", None)
    if len(argv) > 1:
        fail(f"unexpected arguments: {argv[1:]}")
    api.configure_cli_logging()
    config = _CONFIG.value
    try:
        config.keys()  # a config file that failed to load fails here (ml_collections defers it)
    except OSError as e:
        reason = re.search(r"\[Errno \d+\] ([^\n]*)", str(e))
        fail(f"--config: {reason.group(1) if reason else ' '.join(str(e).split())}")
    workdir = _WORKDIR.value
    if workdir is None:
        path = config_flags.get_config_filename(flags.FLAGS["config"])
        workdir = api.default_workdir(config_name(path))
        logging.getLogger("fedjax_poison").info("workdir: %s", workdir)
    if STOP is not None:
        STOP.resume = resume_command(workdir)  # what a second Ctrl-C prints
    try:
        fedjax_poison.run(config, workdir, stop=STOP)
        sharding.leave_distributed()
    except train.Interrupted as e:
        stopped(str(e), e.workdir)
    except KeyboardInterrupt:  # imported as a module (no STOP): a second Ctrl-C
        stopped("interrupted; what was saved resumes", workdir)
    except UserError as e:
        fail(str(e))
    if STOP is not None and STOP.is_set():
        logging.getLogger("fedjax_poison").warning(
            "the run had finished when it was interrupted: its results are complete"
        )


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
