"""Write errors of a run's files as one line naming the path, the cause and the fix, and stops that end in bounded
time even when a write hangs (a full disk, a read-only or dead bucket mount).

Every writer of the workdir (checkpoints, metrics, TensorBoard, the report) writes inside `writing(path)`: an
OS-level failure becomes a `WriteError` (a cli.UserError: one stderr line, exit status 2), and a write still in
flight when SIGTERM/SIGINT arrives is given `patience` seconds before the process exits without it.
"""
from __future__ import annotations

import contextlib
import errno
import os
import re
import sys
import threading
import time

from zenjax import cli

FIXES = {
    errno.ENOSPC: "free space, then rerun the same command to resume, or pass another --workdir",
    errno.EDQUOT: "free space or raise the quota, then rerun the same command to resume, or pass another --workdir",
    errno.EROFS: "make the filesystem writable, then rerun the same command to resume, or pass another --workdir",
    errno.EACCES: "give this user write access, then rerun the same command to resume, or pass another --workdir",
}
FIXES[errno.EPERM] = FIXES[errno.EACCES]
OTHER_FIX = "check the disk or mount, then rerun the same command to resume, or pass another --workdir"
# TensorStore (under Orbax) reports OS errors as ValueErrors whose text ends in this.
_TENSORSTORE_ERRNO = re.compile(r"os_error_code='(\d+)'")

_in_flight: dict[int, tuple[str, float, float]] = {}  # id -> (path, start time, patience)
_lock = threading.Lock()
_watching = [0]  # the generation of stop signals watched; stop_watching() ends the watchdogs of earlier ones


class WriteError(cli.UserError):
    """A file of the run could not be written: an operator-fixable cause, the last complete checkpoint is kept."""


def os_errno(e: BaseException) -> int | None:
    """The OS error number behind an exception, looking through causes, contexts and TensorStore's messages."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno:
            return e.errno
        if m := _TENSORSTORE_ERRNO.search(str(e)):
            return int(m.group(1))
        e = e.__cause__ or e.__context__
    return None


def write_error(e: BaseException, path: str) -> WriteError | None:
    """The one-line error for a failed write under `path`, or None if `e` is not an OS error."""
    if isinstance(e, WriteError):
        return e
    code = os_errno(e)
    if code is None:
        return None
    return WriteError(f"{os.strerror(code).lower()} in {path}: {FIXES.get(code, OTHER_FIX)}")


@contextlib.contextmanager
def writing(path: str, patience: float = 5.0):
    """Marks a write under `path`: an OS error in it is raised as a WriteError; after a stop signal the process
    exits if the write has not returned `patience` seconds after it began."""
    key = object()
    with _lock:
        _in_flight[id(key)] = (str(path), time.monotonic(), patience)
    try:
        yield
    except Exception as e:  # noqa: BLE001 - only OS errors are converted, the rest re-raised as they were
        error = write_error(e, str(path))
        if error is None:
            raise
        raise error from None
    finally:
        with _lock:
            del _in_flight[id(key)]


def exit_if_blocked(signum: int) -> None:
    """Started by a stop signal: a daemon thread that ends the process (status 128 + signum, one line) once a
    write has been in flight past its patience; the main thread may be stuck in that write, unable to stop."""
    generation = _watching[0]

    def watch():
        while generation == _watching[0]:
            now = time.monotonic()
            with _lock:
                stuck = [(path, now - t0) for path, t0, patience in _in_flight.values() if now - t0 > patience]
            if stuck:
                path, waited = stuck[0]
                sys.stderr.write(f"error: stopping: a write to {path} has not returned for {waited:.0f} s; exiting "
                                 "without it (the last complete checkpoint is kept): check the disk or mount\n")
                sys.stderr.flush()
                os._exit(128 + signum)
            time.sleep(0.5)

    threading.Thread(target=watch, name="zenjax-stop-watchdog", daemon=True).start()


def stop_watching() -> None:
    """Ends the watchdogs of earlier stop signals (a run in the same process that then stopped)."""
    _watching[0] += 1
