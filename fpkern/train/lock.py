"""One training run per workdir: an exclusive OS file lock on ``<workdir>/train.lock``.

The lock is ``fcntl.flock`` on an open file, so the kernel releases it when its holder exits
in any way (return, exception, SIGKILL, a crash): a lock file left behind by a dead run never
blocks the next one. While held, the file names its holder (pid, host, start time and
command) so that a second run in the same workdir refuses to start with a message saying
who holds it. Under torch.distributed rank 0 alone takes the lock and tells the other ranks
the outcome, so every rank of a refused run refuses alike instead of waiting on rank 0.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shlex
import socket
import sys
import time
from pathlib import Path
from typing import Any

from fpkern.errors import UsageError

try:
    import fcntl
except ImportError:  # not POSIX: runs go unlocked (said once, at acquire)
    fcntl = None

__all__ = ["LOCK_NAME", "WorkdirBusy", "WorkdirLock", "lock_workdir"]

log = logging.getLogger(__name__)

LOCK_NAME = "train.lock"

# the filesystem cannot lock (some network mounts): run unlocked rather than not at all
_NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


class WorkdirBusy(UsageError):
    """Another live training run holds the workdir's lock."""


def _command() -> str:
    argv = getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv]
    return " ".join(shlex.quote(a) for a in argv)


def _describe(holder: dict[str, Any] | None) -> str:
    if not holder:
        return "a run that has not written its details yet"
    started = holder.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if started else "?"
    return (f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, started {when}, "
            f"command: {holder.get('command', '?')}")


class WorkdirLock:
    """The exclusive lock of one workdir, held from ``acquire()`` to ``release()`` (or the
    end of a ``with`` block, or the process). ``acquire`` raises WorkdirBusy, naming the
    holder, when another run holds it, and UsageError when the workdir cannot be written."""

    def __init__(self, workdir: str | os.PathLike):
        self.workdir = Path(workdir)
        self.path = self.workdir / LOCK_NAME
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def holder(self) -> dict[str, Any] | None:
        """The details the holder wrote in the lock file, None if absent or unreadable."""
        try:
            found = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return found if isinstance(found, dict) else None

    def acquire(self) -> WorkdirLock:
        if self._fd is not None:
            return self
        if fcntl is None:
            log.warning("no fcntl on this platform: %s is not locked against a second run",
                        self.workdir)
            return self
        try:
            self.workdir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise UsageError(f"--workdir {self.workdir}: cannot create {LOCK_NAME} in it: "
                             f"{e.strerror or e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise WorkdirBusy(f"--workdir {self.workdir} is in use by another training run "
                                  f"({_describe(self.holder())}); wait for it to end or choose "
                                  "another --workdir") from None
            if e.errno in _NO_LOCKS:
                log.warning("the filesystem of %s cannot lock files (%s): it is not locked "
                            "against a second run", self.workdir, e.strerror)
                return self
            raise
        self._fd = fd
        self._write_holder()
        return self

    def _write_holder(self) -> None:
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
                "command": _command()}
        data = (json.dumps(info) + "\n").encode()
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, data, 0)

    def release(self) -> None:
        """Unlock; the file stays (removing it would race with a run opening it)."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            os.ftruncate(fd, 0)  # no stale holder details for the next reader
        except OSError:
            pass
        finally:
            os.close(fd)  # closing the last descriptor releases the flock

    def __enter__(self) -> WorkdirLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def lock_workdir(workdir: str | os.PathLike, rank: int = 0, world: int = 1) -> WorkdirLock:
    """Take the workdir's lock on rank 0; with world > 1 (torch.distributed initialised) the
    other ranks learn whether it was granted and raise the same error if not."""
    lock = WorkdirLock(workdir)
    if world <= 1:
        return lock.acquire()
    import torch.distributed as dist

    refusal: list[Any] = [None]
    failed: Exception | None = None
    if rank == 0:
        try:
            lock.acquire()
        except Exception as e:  # whatever it is, the other ranks must not wait for rank 0
            failed, refusal = e, [(type(e).__name__, str(e))]
    dist.broadcast_object_list(refusal, src=0)
    if failed is not None:
        raise failed
    if refusal[0] is not None:
        kind, message = refusal[0]
        if kind == WorkdirBusy.__name__:
            raise WorkdirBusy(message)
        raise (UsageError if kind == UsageError.__name__ else RuntimeError)(
            f"rank 0 could not lock the workdir: {message}")
    return lock
