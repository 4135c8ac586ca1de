"""Files written so that a crash never leaves half of one: atomic replaces, appends that
fail whole, JSON lines read strictly; every OS error as one line naming the path."""

import codecs
import contextlib
import errno
import json
import math
import os
import secrets
from collections.abc import Mapping

from fedjax_poison import errors


class WorkdirError(errors.UserError):
    """The workdir cannot be claimed, read or written; one line naming the path and what to do."""


def clean(value):
    """JSON-safe: NaN and inf become null, numpy scalars and arrays become Python values."""
    if isinstance(value, Mapping):
        return {clean(k): clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    if hasattr(value, "tolist"):
        return clean(value.tolist())
    if hasattr(value, "to_dict"):  # an ml_collections.ConfigDict
        return clean(value.to_dict())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def dumps(obj) -> str:
    """One line of strict JSON (no NaN) for `obj` after `clean`."""
    return json.dumps(clean(obj), allow_nan=False)


def write_atomic(path: str, data: bytes) -> None:
    """Writes a temporary file beside `path`, puts it on disk, then renames it to `path`."""
    folder, base = os.path.split(path)
    temp = os.path.join(folder, f".{base}.{secrets.token_hex(4)}.tmp")
    fd = None
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
        _write_all(fd, data)
        os.fsync(fd)
        os.close(fd)
        fd = None
        os.replace(temp, path)
    except OSError as e:
        if fd is not None:
            os.close(fd)
        with contextlib.suppress(OSError):
            os.remove(temp)
        raise error(path, e, "write") from None


def append(path: str, data: bytes) -> None:
    """Appends `data` and puts it on disk; on failure, cuts the file back to its old size."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o666)
    except OSError as e:
        raise error(path, e, "write") from None
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            raise WorkdirError(
                f"{show(path)} ends in a cut-off line: rewrite it (truncate_lines) first"
            )
        try:
            _write_all(fd, data)
            os.fsync(fd)
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, size)
            raise
    except OSError as e:
        raise error(path, e, "write") from None
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def row_line(row) -> bytes:
    if not isinstance(row, Mapping):
        raise TypeError(f"a JSON-lines row must be a mapping, got {type(row).__name__}")
    return (dumps(row) + "\n").encode("utf-8")


def parse_lines(path: str, data: bytes) -> list[dict]:
    lines = data.split(b"\n")
    last = lines.pop()  # b"" when the file ends with a newline
    rows = [_parse_line(path, n, line) for n, line in enumerate(lines, 1)]
    if last:
        try:
            rows.append(_parse_line(path, len(lines) + 1, last))
        except WorkdirError:
            if not _cut_off(last):
                raise
    return rows


def _parse_line(path: str, number: int, line: bytes) -> dict:
    try:
        row = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError:
        problem = "is not UTF-8 text"
    except (ValueError, RecursionError):
        problem = "is not JSON"
    else:
        if isinstance(row, dict):
            return row
        problem = f"is a JSON {type(row).__name__}, not an object"
    raise WorkdirError(
        f"{show(path)} line {number} {problem}: the file was changed or damaged; fix or "
        "delete that line (the file was left as it is)"
    )


def _cut_off(line: bytes) -> bool:
    """Whether a last line without a newline is what a killed writer leaves: part of a row."""
    try:
        text = codecs.getincrementaldecoder("utf-8")().decode(line, final=False)
    except UnicodeDecodeError:
        return False
    return text.startswith("{")


def show(text: str) -> str:
    """`text` on one line: control characters escaped."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def short(value) -> str:
    text = show(repr(value))
    return text if len(text) <= 80 else text[:77] + "..."


def error(path: str, e: OSError, verb: str) -> WorkdirError:
    reason = e.strerror or type(e).__name__
    advice = "free some space" if e.errno in (errno.ENOSPC, errno.EDQUOT) else "fix that"
    return WorkdirError(f"cannot {verb} {show(path)}: {reason}: {advice}, or use another --workdir")


def read_lines(path: str) -> list[dict]:
    """The rows of JSON-lines file `path` ([] if missing); never changes the file.

    A last line without its newline that was cut off (a killed writer) is dropped; any
    other line that is not a JSON object raises WorkdirError naming it.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return []
    except OSError as e:
        raise error(path, e, "read") from None
    return parse_lines(path, data)
