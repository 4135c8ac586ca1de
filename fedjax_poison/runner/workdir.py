"""A run's workdir: claimed under a lock, written atomically, cleared of the run's files only.

A workdir is the run's if it holds MARKER, the tool's manifest: the tool, the format, when
the run began, its config, and every relative path the run wrote:

    "file"    written through the workdir; clear() deletes it
    "folder"  made to hold written files (features/, plots/); clear() deletes it only when
              nothing is left in it, so a file the user put there stays
    "handed"  made by folder() for another writer (orbax's checkpoints/, tensorboard/), which
              lists what it writes there with own(); clear() deletes it, like a folder, only
              when nothing is left in it
    "owned"   listed by own(): a folder wholly that writer's (one checkpoint); clear() deletes
              it with everything in it

A path enters the manifest before it is written (or, for a writer that names its files
itself, right after), so clear() deletes exactly what the run wrote: a file the user put in
the workdir or in any of its folders stays. A folder that holds anything and no marker (a
lone LOCK file of someone else included) is never the run's: it is refused, and nothing in
it is deleted. LOCK holds an flock while a run uses the workdir; the kernel drops it when
that process ends, however it ends, so a lock never outlives its run.
"""

import contextlib
import datetime
import errno
import fcntl
import json
import os
import shutil
import socket
import sys
from collections.abc import Callable, Iterable, Mapping

from absl import logging

from fedjax_poison import files
from fedjax_poison.files import WorkdirError, clean, dumps

TOOL = "fedjax_poison"
FORMAT = 1
MARKER = "fedjax_poison_run.json"
LOCK = ".lock"
# Fields that may change between the launches of one run: they do not change its results.
RESUMABLE_FIELDS = ("overwrite", "checkpoint_every", "distributed.timeout_s")
FILE, FOLDER, HANDED, OWNED = "file", "folder", "handed", "owned"
KINDS = (FILE, FOLDER, HANDED, OWNED)
_held: set = set()  # (device, inode) of the lock files this process holds


class Workdir:
    """A claimed, locked workdir; every file of a run is written through it.

    On a process that is not the primary one of a multi-host run, writes and clear() do
    nothing and folder() only names the path: one process writes, the others read.
    """

    def __init__(self, path: str, lock, header: dict, resumed: bool, primary: bool):
        self.path = path  # absolute
        self.resumed = resumed  # the workdir held a run of this config (always False off primary)
        self.primary = primary
        self._lock = lock  # the open LOCK file, or None
        self._header = {k: v for k, v in header.items() if k != "paths"}
        self._paths = dict(header.get("paths", {}))
        self.created = False  # this claim made the folder
        self.grown: dict = {}  # growable fields raised since the marker: {field: value there}
        self._grown_config: dict | None = None  # the config adopt_config() writes

    @classmethod
    def claim(
        cls,
        path,
        config: Mapping,
        *,
        overwrite: bool,
        resumable_fields: Iterable[str] = RESUMABLE_FIELDS,
        primary: bool = True,
        growable: Iterable[str] = (),
    ) -> "Workdir":
        """Locks `path` and resumes the run of `config` in it, or starts one.

        A workdir of another config (up to resumable_fields) is refused, unless overwrite
        clears it first. A growable field (a number, e.g. num_rounds) raised since the run
        began resumes it: `grown` names the old values, and the marker keeps them until
        adopt_config(); lowered, it is refused unless overwrite. Nothing is created, locked
        or read off the primary process.
        """
        path = _check_path(path)
        if not primary:
            return cls(path, None, {}, resumed=False, primary=False)
        _refuse_foreign(path)  # before the lock file: a stranger's folder gets nothing new
        created = not os.path.lexists(path)
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as e:
            raise files.error(path, e, "create") from None
        lock = _take_lock(path)
        try:
            claimed = cls._open(
                path, lock, json.loads(dumps(config)), overwrite, resumable_fields, growable
            )
            claimed.created = created
            return claimed
        except BaseException:
            _release(lock)
            raise

    @classmethod
    def attach(cls, path) -> "Workdir":
        """Locks the workdir of an existing run, whatever its config, to add files to it."""
        path = _check_path(path)
        missing = WorkdirError(
            f"workdir {files.show(path)} holds no run ({MARKER} is missing): name a run's workdir"
        )
        if not os.path.isdir(path) or _read_marker(path) is None:
            raise missing  # before the lock file: a stranger's folder gets nothing new
        lock = _take_lock(path)
        try:
            marker = _read_marker(path)
            if marker is None:
                raise missing
            return cls(path, lock, marker, resumed=True, primary=True)
        except BaseException:
            _release(lock)
            raise

    @classmethod
    def _open(cls, path, lock, config, overwrite, resumable_fields, growable) -> "Workdir":
        _refuse_foreign(path)  # again, now that no other claim can run
        marker = _read_marker(path)
        if marker is None:
            fresh = cls(path, lock, _new_header(config), resumed=False, primary=True)
            fresh._save_marker()
            return fresh
        old = cls(path, lock, marker, resumed=True, primary=True)
        fields, growable = tuple(resumable_fields), tuple(growable)
        there = marker["config"]
        both = fields + growable
        difference = _first_difference(_strip(there, both), _strip(config, both))
        difference = difference or _first_difference(_strip(there, fields), _strip(config, fields))
        if difference is None:
            return old
        field, was, now = difference
        if field in growable and _is_number(was) and _is_number(now) and now > was:
            old.grown = {f: there[f] for f in growable if there.get(f) != config.get(f)}
            old._grown_config = config
            return old
        if field in growable and not overwrite:
            raise WorkdirError(
                f"workdir {files.show(path)} holds a run of {field}={files.short(was)}, and "
                f"{field}={files.short(now)} would shorten it: a run can go on to more, not "
                "fewer; keep the value, use another --workdir, or --config.overwrite=True to "
                "replace it"
            )
        if not overwrite:
            raise WorkdirError(
                f"workdir {files.show(path)} holds a run of another config ({field} is "
                f"{files.short(was)} there, {files.short(now)} now): use another --workdir, or "
                "--config.overwrite=True to replace it"
            )
        logging.warning("overwrite: replacing the run in %s (%s was %r)", path, field, was)
        old.clear()
        old._header, old.resumed = _new_header(config), False
        old._save_marker()
        return old

    def adopt_config(self) -> None:
        """Writes the claim's config, with its grown fields, into the marker (see claim)."""
        if self._grown_config is not None:
            self._header = {**self._header, "config": self._grown_config}
            self._save_marker()
            self.grown, self._grown_config = {}, None

    def clear(self) -> None:
        """Deletes what the manifest lists, and nothing else (see the module docstring)."""
        if not self.primary:
            return
        self._check_open(self.path)
        by_depth = sorted(self._paths.items(), key=lambda item: -item[0].count("/"))
        for kinds in ((OWNED,), (FILE,), (FOLDER, HANDED)):
            for name, kind in by_depth:
                if kind in kinds:
                    _delete(self.path, name, kind)
        # A folder that still holds a user's file stays the run's: the next run may use it.
        self._paths = {n: k for n, k in self._paths.items() if os.path.lexists(self.join(n))}
        self._save_marker()

    def folder(self, name: str) -> str:
        """The path of sub-folder `name`, made for another writer (see HANDED and own())."""
        path = self.join(name)
        if not self.primary or self._inside_owned(self._check_open(name)):
            return path
        if self._paths.get(name) not in (HANDED, OWNED):  # OWNED: an older version's
            if os.path.lexists(path):
                raise WorkdirError(
                    f"{files.show(path)} exists but was not made by this run: move it out of the "
                    "workdir, or use another --workdir"
                )
            self._make_parents(name)
            self._record(name, HANDED)
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as e:
            raise files.error(path, e, "create") from None
        return path

    def own(self, name: str, kind: str = OWNED) -> None:
        """Lists `name`, inside a folder() and written by its writer, as the run's.

        kind OWNED: a folder wholly the writer's (clear() deletes it with its content); FILE:
        one file. The folders between are listed as folders; entries of that folder() whose
        files are gone (a writer deleted them) leave the manifest. Off the primary process
        of a multi-host run, nothing is listed (it writes nothing).
        """
        if not self.primary:
            return
        self._check_open(self.join(name))
        if kind not in (FILE, OWNED):
            raise ValueError(f"own() lists a file or an owned folder, not a {kind}")
        parts = name.split("/")
        handed = next(
            (i for i in range(1, len(parts)) if self._paths.get("/".join(parts[:i])) == HANDED),
            None,
        )
        if handed is None:
            raise ValueError(f"{name} is not inside a folder() of this run")
        if not self.primary or self._inside_owned(name) or self._paths.get(name) == kind:
            return
        top = "/".join(parts[:handed]) + "/"
        added = {"/".join(parts[:i]): FOLDER for i in range(handed + 1, len(parts))}
        added = {n: k for n, k in added.items() if n not in self._paths}
        added[name] = kind
        before = dict(self._paths)
        self._paths = {
            n: k
            for n, k in self._paths.items()
            if not n.startswith(top) or os.path.lexists(os.path.join(self.path, n))
        }
        self._paths.update(added)
        try:
            self._save_marker()
        except WorkdirError:
            self._paths = before
            raise

    def join(self, name: str) -> str:
        """The absolute path of `name` (relative, inside the workdir)."""
        _check_name(name)
        return os.path.join(self.path, name)

    def write_text(self, name: str, text: str) -> None:
        """Replaces file `name` with `text` atomically (see write_bytes)."""
        self.write_bytes(name, text.encode("utf-8"))

    def write_json(self, name: str, obj) -> None:
        """Replaces file `name` with `obj` as indented JSON (see `clean`), atomically."""
        self.write_text(name, json.dumps(clean(obj), indent=2, allow_nan=False) + "\n")

    def write_bytes(self, name: str, data: bytes) -> None:
        """Replaces file `name` atomically: readers see the old content or the new, whole.

        The file is readable by others as far as the umask allows (0644 under umask 022).
        """
        if self.primary:
            files.write_atomic(self._prepare(name), bytes(data))

    def append_lines(self, name: str, rows: Iterable[Mapping]) -> None:
        """Appends one JSON line per row, on disk when it returns; on failure, none of them."""
        data = b"".join(files.row_line(row) for row in rows)
        if self.primary and data:
            files.append(self._prepare(name), data)

    def read_lines(self, name: str) -> list[dict]:
        """The rows of JSON-lines file `name` (see files.read_lines); never changes it."""
        return files.read_lines(self.join(name))

    def truncate_lines(self, name: str, keep: Callable[[dict], bool]) -> int:
        """Rewrites `name` keeping the rows for which keep(row) is true; returns how many.

        A damaged file raises (see read_lines) before anything is rewritten.
        """
        rows = [row for row in self.read_lines(name) if keep(row)]
        self.write_text(name, "".join(dumps(row) + "\n" for row in rows))
        return len(rows)

    def exists(self, name: str) -> bool:
        """Whether file `name` exists in the workdir."""
        return os.path.isfile(self.join(name))

    def read_json(self, name: str):
        """The JSON value of file `name`; WorkdirError naming it if it cannot be read."""
        path = self.join(name)
        try:
            with open(path, "rb") as f:
                return json.loads(f.read().decode("utf-8"))
        except OSError as e:
            raise files.error(path, e, "read") from None
        except (ValueError, RecursionError):
            raise WorkdirError(
                f"{files.show(path)} is not JSON: the file was changed or damaged; fix or delete it"
            ) from None

    def release(self) -> None:
        """Gives up the lock; the workdir cannot be written through this object afterwards."""
        if self._lock is not None:
            _release(self._lock)
            self._lock = None

    def discard(self) -> bool:
        """Removes a run's folder that holds nothing but this claim's own marker and lock
        (a run refused before it wrote anything, e.g. for missing data), and releases it.
        The folder itself goes only if this claim made it. True when nothing of the claim
        is left; anything else in the folder keeps it as it is."""
        if not (self.primary and self._lock is not None and not self.resumed):
            return False
        if sorted(os.listdir(self.path)) != sorted([MARKER, LOCK]) or self._paths:
            return False
        os.remove(os.path.join(self.path, MARKER))
        os.remove(os.path.join(self.path, LOCK))
        self.release()
        if self.created:
            with contextlib.suppress(OSError):
                os.rmdir(self.path)
        return True

    def __enter__(self) -> "Workdir":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def _inside_owned(self, name: str) -> bool:
        parts = name.split("/")
        return any(self._paths.get("/".join(parts[:i])) == OWNED for i in range(1, len(parts)))

    def _prepare(self, name: str) -> str:
        """The path of file `name`, listed in the manifest, its folders made."""
        path = self._check_open(self.join(name))
        self._make_parents(name)
        if not self._inside_owned(name):
            self._record(name, FILE)
        return path

    def _check_open(self, value):
        if self._lock is None:
            raise RuntimeError(f"workdir {self.path} was released")
        return value

    def _make_parents(self, name: str) -> None:
        """Makes the missing folders on the way to `name`, listed unless in an owned one."""
        parts = name.split("/")[:-1]
        for folder in ("/".join(parts[: i + 1]) for i in range(len(parts))):
            path = os.path.join(self.path, folder)
            if not os.path.isdir(path):
                if not (os.path.lexists(path) or self._inside_owned(folder)):
                    self._record(folder, FOLDER)
                try:
                    os.mkdir(path)
                except OSError as e:
                    raise files.error(path, e, "create") from None

    def _record(self, name: str, kind: str) -> None:
        before = self._paths.get(name)
        if before == kind:
            return
        if before is not None:
            raise ValueError(f"{name} is a {before} of this run, it cannot become a {kind}")
        self._paths[name] = kind
        try:
            self._save_marker()
        except WorkdirError:
            del self._paths[name]
            raise

    def _save_marker(self) -> None:
        marker = {**self._header, "paths": dict(sorted(self._paths.items()))}
        files.write_atomic(
            os.path.join(self.path, MARKER), (json.dumps(marker, indent=2) + "\n").encode()
        )


def _check_path(path) -> str:
    """The absolute path of a workdir that can be one; raises WorkdirError otherwise."""
    text = "" if path is None else os.fsdecode(path)
    if not text.strip():
        raise WorkdirError("--workdir is empty (an unset variable?): name the folder of the run")
    if "\0" in text:
        raise WorkdirError(
            f"--workdir {files.show(text)} holds a NUL character: name another folder"
        )
    path = os.path.abspath(os.path.expanduser(text))
    if os.path.islink(path) and not os.path.exists(path):
        raise WorkdirError(
            f"--workdir {files.show(path)} is a symbolic link to "
            f"{files.show(os.readlink(path))}, which does not exist: make that folder, or "
            "name another --workdir"
        )
    if os.path.lexists(path) and not os.path.isdir(path):
        raise WorkdirError(f"--workdir {files.show(path)} is a file, not a folder: name a folder")
    return path


def _refuse_foreign(path: str) -> None:
    """Raises unless `path` is missing, empty, or holds the marker."""
    try:
        names = sorted(os.listdir(path))
    except FileNotFoundError:
        return
    except OSError as e:
        raise files.error(path, e, "list") from None
    if LOCK in names and _lock_record(os.path.join(path, LOCK)) is not None:
        names.remove(LOCK)  # a lock of this tool, left by a run stopped before its marker
    if names and MARKER not in names:
        more = f" and {len(names) - 1} more" if len(names) > 1 else ""
        raise WorkdirError(
            f"workdir {files.show(path)} holds {files.show(names[0])}{more} but no {MARKER}, "
            "so it is not a run's (or one of an older version): use a new or empty --workdir; "
            "nothing was deleted"
        )


def _take_lock(path: str):
    """The open LOCK file of `path`, flocked and naming this process; raises if taken."""
    lock_path = os.path.join(path, LOCK)
    try:
        lock = open(lock_path, "a+", encoding="utf-8")
    except OSError as e:
        raise files.error(lock_path, e, "lock") from None
    key = os.fstat(lock.fileno())[1:3]  # inode, device: flock on NFS is per process
    try:
        if key in _held:
            raise BlockingIOError
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.close()
        raise WorkdirError(
            f"workdir {files.show(path)} is in use by {_holder(lock_path)}: wait for that run to "
            "end, or use another --workdir"
        ) from None
    _held.add(key)
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    info = {"tool": TOOL, "pid": os.getpid(), "host": socket.gethostname(), "since": now}
    info["argv"] = sys.argv
    with contextlib.suppress(OSError):  # the lock holds without its note
        lock.truncate(0)
        lock.write(json.dumps(info) + "\n")
        lock.flush()
    return lock


def _lock_record(lock_path: str) -> dict | None:
    """The note in a lock file of this tool, or None (missing, empty, or not this tool's)."""
    try:
        with open(lock_path, "rb") as f:
            info = json.loads(f.read(1 << 16).decode("utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    keys = ("pid", "host", "since", "argv")
    if not (isinstance(info, dict) and all(k in info for k in keys)):
        return None
    return info if info.get("tool", TOOL) == TOOL else None


def _holder(lock_path: str) -> str:
    info = _lock_record(lock_path)
    try:
        argv = files.show(" ".join(map(str, info["argv"])))
        return f"pid {info['pid']} on {info['host']} since {info['since']} ({argv[:200]})"
    except (KeyError, TypeError):
        return "another process"


def _release(lock) -> None:
    with contextlib.suppress(OSError, ValueError):
        _held.discard(os.fstat(lock.fileno())[1:3])
    lock.close()  # closing drops the flock


def _new_header(config: dict) -> dict:
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return {"tool": TOOL, "format": FORMAT, "created": now, "config": config}


def _read_marker(path: str) -> dict | None:
    """The manifest in `path`, checked; None if there is none."""
    marker_path = os.path.join(path, MARKER)
    try:
        with open(marker_path, "rb") as f:
            marker = json.loads(f.read().decode("utf-8"))
    except FileNotFoundError:
        return None
    except OSError as e:
        raise files.error(marker_path, e, "read") from None
    except (ValueError, RecursionError):
        marker = None
    paths = marker.get("paths") if isinstance(marker, dict) else None
    if not (
        isinstance(paths, dict)
        and isinstance(marker.get("config"), dict)
        and (marker.get("tool"), marker.get("format")) == (TOOL, FORMAT)
        and all(_valid_name(n) and k in KINDS for n, k in paths.items())
    ):
        raise WorkdirError(
            f"{files.show(marker_path)} is damaged or of another version of {TOOL}: nothing was "
            "deleted; move the workdir's files away by hand, or use another --workdir"
        )
    return marker


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _strip(config: dict, fields: tuple) -> dict:
    """config without `fields` (dotted names reach into blocks: 'distributed.timeout_s')."""
    kept = {k: v for k, v in config.items() if k not in fields}
    for field in fields:
        block, _, rest = field.partition(".")
        if rest and isinstance(kept.get(block), dict):
            kept[block] = _strip(kept[block], (rest,))
    return kept


def _first_difference(old, new, prefix: str = ""):
    """(field, old value, new value) of the first field that differs, or None."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            found = _first_difference(old.get(key), new.get(key), f"{prefix}{key}.")
            if found is not None:
                return found
        return None
    return None if old == new else (prefix.rstrip("."), old, new)


def _valid_name(name) -> bool:
    """Whether `name` is a normalized relative path inside the workdir, not its own files."""
    return (
        isinstance(name, str)
        and name not in ("", ".", MARKER, LOCK)
        and "\0" not in name
        and not os.path.isabs(name)
        and os.path.normpath(name) == name
        and name.split("/")[0] != ".."
    )


def _check_name(name) -> None:
    if not _valid_name(name):
        raise ValueError(f"not a file name inside the workdir: {name!r}")


def _delete(root: str, name: str, kind: str) -> None:
    """Deletes one manifest entry; a folder of written files only when it is empty."""
    path = os.path.join(root, name)
    inside = os.path.realpath(root)
    if os.path.commonpath([os.path.realpath(os.path.dirname(path)), inside]) != inside:
        return  # a folder on the way was made a link out of the workdir
    try:
        if kind in (FOLDER, HANDED):
            os.rmdir(path)
        elif kind == OWNED and os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        elif not os.path.isdir(path) or os.path.islink(path):
            os.remove(path)
    except (FileNotFoundError, NotADirectoryError):
        pass
    except OSError as e:
        if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise files.error(path, e, "delete") from None
