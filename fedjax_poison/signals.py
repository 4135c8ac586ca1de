"""Ctrl-C (SIGINT) and SIGTERM for the command lines: a request to stop, read at safe points.

A signal never raises inside the program: while XLA compiles or runs, an exception thrown
into Python (KeyboardInterrupt) can leave the process to crash at its exit. Instead the
first signal sets a flag that the run reads where stopping loses nothing (after its set-up,
after compiling, after each evaluation and its checkpoint, between the files it writes at
the end), and the command then ends in one line with status 130. A second signal ends the
process at once, also in one line and with status 130, whatever it is doing: the last
checkpoint resumes it.

The signals are read by a thread through `signal.set_wakeup_fd`, not by a Python handler,
because a Python handler runs only when the main thread is back in Python: during a long
compile, a second Ctrl-C would wait for it. This module imports nothing heavy, so that a
command can call `catch()` before it imports JAX.
"""

import os
import signal
import socket
import threading

STATUS = 130  # a command stopped by the user, as a shell reports Ctrl-C
SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequest(threading.Event):
    """Set by the first SIGINT or SIGTERM; `resume` is printed if a second one ends the run."""

    resume: str = ""


def catch() -> StopRequest:
    """Makes SIGINT and SIGTERM requests to stop; call it first thing, in the main thread.

    The first signal sets the returned request and says so in one line on stderr; the
    second prints one line (and `request.resume`) and ends the process with STATUS.
    """
    request = StopRequest()
    reader, writer = socket.socketpair()
    writer.setblocking(False)
    for s in SIGNALS:
        signal.signal(s, _ignore)  # the thread below does the work
    signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
    thread = threading.Thread(
        target=_watch, args=(reader, writer, request), name="signals", daemon=True
    )
    thread.start()
    return request


def terminate_as_interrupt() -> None:
    """SIGTERM stops the program as Ctrl-C does (KeyboardInterrupt), for the commands that hold
    no run and no compiled program (report, pca_analysis): each file they write is whole,
    so stopping anywhere loses nothing. Call it in the main thread."""
    signal.signal(signal.SIGTERM, signal.default_int_handler)


def _ignore(signum, frame) -> None:
    """Python's own handler: nothing, so that no KeyboardInterrupt is raised anywhere."""


def _watch(reader: socket.socket, writer: socket.socket, request: StopRequest) -> None:
    """Reads the signal numbers the C handler writes; sets the request, then ends the process."""
    # `writer` is the wakeup fd: held here, it stays open as long as this thread runs.
    while True:
        received = reader.recv(64)
        if not received:
            return
        for signum in received:
            if signum not in SIGNALS:
                continue
            if request.is_set():
                note = f"; resume with:\n  {request.resume}" if request.resume else ""
                _say(f"error: interrupted again: stopped at once{note}")
                os._exit(STATUS)
            request.set()
            _say(
                f"{signal.Signals(signum).name}: stopping at the next safe point, saving the "
                "run (Ctrl-C again: stop at once)"
            )


def _say(line: str) -> None:
    """One line on stderr, written directly: the main thread may be inside a print."""
    try:
        os.write(2, (line + "\n").encode())
    except OSError:
        pass
