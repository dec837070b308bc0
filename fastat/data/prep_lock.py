"""Sharing a prepare between processes: the lock of a ``.NAME.partial`` folder, which a second preparer
(a second run on the same folder) may wait for, and decode workers that end with their parent.

    lock = acquire(partial, out, wait=600, say=log)      # DatasetError at once (wait None) or on timeout
    ProcessPoolExecutor(n, initializer=worker_init, initargs=(os.getpid(), (lock.fileno(),)))

The lock is an ``flock`` on ``partial/lock``: the kernel drops it when its holder dies, however it dies.
Forked workers inherit the descriptor (an flock belongs to the open file, shared with every child), so
each worker closes its copy, and dies with its parent (Linux: ``PR_SET_PDEATHSIG``; elsewhere a thread
that watches the parent id): a ``kill -9`` of a prepare leaves nothing behind, and rerunning it continues.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

from ._errors import DatasetError

__all__ = ["POLL_S", "acquire", "release_unused", "worker_init"]

POLL_S = 0.2  # how often a waiting preparer tries the lock again


def _same_file(f: IO, path: Path) -> bool:
    try:
        a, b = os.fstat(f.fileno()), os.stat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def acquire(partial: Path, out: Path, wait: float | None, say: Callable[[str], None],
            place: str | None = None) -> IO:  # fmt: skip
    """The lock of ``partial`` (created if missing), held by this process. Another holder: DatasetError at
    once when ``wait`` is None or 0, else one line via ``say`` and up to ``wait`` seconds of waiting (then
    DatasetError). A lock file that vanished while waited for (the other prepare finished and renamed its
    folder) is taken again where it is now; the caller then finds ``out`` finished. ``place``: where the
    set is written, for the message when it cannot be."""
    deadline = None
    while True:
        try:
            partial.mkdir(exist_ok=True)
            lock = open(partial / "lock", "w")
        except OSError as e:
            raise DatasetError(f"cannot write {place or f'next to --out {out}'}: {e.strerror or e}") from None
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.close()
            where = f"{out} (lock {partial / 'lock'})"
            if not wait:
                raise DatasetError(f"another fastat prepare is writing {where}") from None
            now = time.monotonic()
            if deadline is None:
                deadline = now + wait
                say(f"fastat: another process is preparing {out}; waiting for it to finish (at most "
                    f"{wait:g} s, data.prepare_wait)")  # fmt: skip
            elif now >= deadline:
                raise DatasetError(f"waited {wait:g} s for another process preparing {where}, which is still "
                                   f"at it: let it finish, or raise data.prepare_wait") from None  # fmt: skip
            time.sleep(POLL_S)
            continue
        if _same_file(lock, partial / "lock"):
            return lock
        lock.close()  # removed between our open and our lock: the other one finished; look again


def release_unused(lock: IO, partial: Path, out: Path) -> None:
    """Let go of a lock taken after another process finished ``out``: our lock file (wherever the other's
    rename put it) and our empty ``partial`` folder go, nothing else."""
    for path in (partial / "lock", out / "lock"):
        if _same_file(lock, path):
            path.unlink(missing_ok=True)
    lock.close()
    try:
        partial.rmdir()  # only if empty: never someone else's progress
    except OSError:
        pass


def worker_init(parent: int, inherited: tuple[int, ...] = ()) -> None:
    """Decode-worker start: close the parent's lock descriptors, and end when the parent ``parent`` does."""
    for fd in inherited:
        try:
            os.close(fd)
        except OSError:
            pass
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.prctl(1, int(signal.SIGKILL), 0, 0, 0) == 0:  # PR_SET_PDEATHSIG
                if os.getppid() != parent:  # it died before the call
                    os._exit(1)
                return
        except (OSError, AttributeError):
            pass
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True, name="fastat-parent-watch").start()


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)
