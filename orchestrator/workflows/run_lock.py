"""The lock a single-process run holds on its output_dir: one run at a time, a dead owner's lock taken over.

`<output_dir>/run.lock` holds the owner as JSON (pid, host, started). A run takes it before any work:
- no lock, or one of a process that no longer runs on this host (a crash): the run takes it (and says so);
- one of a live process on this host, or of another host (whose process cannot be checked from here): the
  run is refused (RunLockedError, exit 2) naming the owner and how to go on.
The file is also held with an exclusive `flock` for the run's whole life, so two runs that start at the
same moment on one host cannot both take over a stale lock. The lock file is opened without following a
symbolic link. `release` deletes it. `take_driver_lock` is the same lock on a sweep's or study's folder
(`driver.lock`), held by its driver. Pure Python: no torch.
Tested by `python -m pytest tests/test_adversarial_outputs.py tests/test_chaos_concurrency.py -q`.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainables.errors import UserError
from trainables.processes import pid_alive

logger = logging.getLogger(__name__)


class RunLockedError(UserError):
    """output_dir is in use by another run (its lock names a live process, or one on another host)."""


def this_host() -> str:
    return socket.gethostname()


def owner_text(owner: dict[str, Any]) -> str:
    started = owner.get("started")
    when = f", started {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(started))}" if isinstance(started, (int, float)) else ""
    return f"process {owner.get('pid')} on host {str(owner.get('host'))[:80]}{when}"


def _read_owner(fd: int) -> dict[str, Any] | None:
    """The lock's owner record, or None when the file is empty or not a record (a crash while writing it)."""
    os.lseek(fd, 0, os.SEEK_SET)
    raw = os.read(fd, 4096)
    try:
        owner = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    return owner if isinstance(owner, dict) and isinstance(owner.get("pid"), int) else None


def _same_file(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


@dataclass
class RunLock:
    path: Path
    fd: int

    @classmethod
    def acquire(cls, path: Path, what: str = "output_dir") -> "RunLock":
        """Take the lock at `path` (its folder must exist) or raise RunLockedError naming the owner."""
        for _ in range(5):  # retried when the file was replaced between opening and locking it
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            except OSError as error:
                raise RunLockedError(f"{what} {path.parent}: cannot create or open its lock file {path.name} "
                                     f"({error.strerror}); check that you can write there, or choose another {what}") from None
            try:
                lock = cls._take(path, fd, what)
            except BaseException:
                os.close(fd)
                raise
            if lock is not None:
                return lock
            os.close(fd)
        raise RunLockedError(f"{what} {path.parent}: its lock file {path.name} keeps changing; another run is starting there")

    @classmethod
    def _take(cls, path: Path, fd: int, what: str) -> "RunLock | None":
        refuse = (f"; wait for it to finish or choose another {what}. If no such run is alive, delete {path} "
                  "and start again")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = _read_owner(fd)
            raise RunLockedError(f"{what} {path.parent} is in use by another run "
                                 f"({owner_text(owner) if owner else 'a process on this host'}){refuse}") from None
        try:
            same_file = _same_file(os.fstat(fd), os.lstat(path))
        except FileNotFoundError:
            same_file = False
        if not same_file:
            return None  # released (deleted) by its owner in between: open the new file
        owner, host = _read_owner(fd), this_host()
        if owner is not None:
            if owner.get("host") != host:
                raise RunLockedError(f"{what} {path.parent} is locked by a run on another host ({owner_text(owner)})"
                                     f"{refuse}")
            if pid_alive(owner["pid"]):
                raise RunLockedError(f"{what} {path.parent} is in use by another run ({owner_text(owner)}){refuse}")
            logger.warning("%s %s: taking over the lock of %s, which no longer runs", what, path.parent, owner_text(owner))
        record = json.dumps({"pid": os.getpid(), "host": host, "started": time.time()}).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, record, 0)
        os.fsync(fd)
        return cls(path, fd)

    def release(self) -> None:
        """Delete the lock file (it is still this run's: the flock is held) and let go of it."""
        if self.fd < 0:
            return
        try:
            if _same_file(os.fstat(self.fd), os.lstat(self.path)):
                self.path.unlink()
        except FileNotFoundError:
            pass
        finally:
            os.close(self.fd)
            self.fd = -1



DRIVER_LOCK = "driver.lock"


def take_driver_lock(folder: str | Path | None, what: str) -> RunLock | None:
    """The lock a `dpo sweep` / `dpo study` driver holds on its folder (<storage_path>/<name>) while it runs;
    the caller releases it (`release_driver_lock`) when the driver ends.

    A second driver of the same name is refused at once (RunLockedError naming the running one's pid, host
    and start time), also from another host when storage_path is shared storage that keeps the lock file;
    the lock of a driver that died on this host is taken over. `folder` None (object storage, which has no
    lock files): no lock, and a warning.
    """
    if folder is None:
        logger.warning("%s: storage_path is object storage, which has no lock files; nothing stops a second driver "
                       "of the same name from running at the same time", what)
        return None
    Path(folder).mkdir(parents=True, exist_ok=True)
    return RunLock.acquire(Path(folder) / DRIVER_LOCK, what=what)


def refuse_if_running(folder: str | Path | None, what: str) -> None:
    """Raise RunLockedError now if a driver of this name runs, before the caller opens the run's console.log
    (a refused second driver must not write into the running one's log); the driver takes the lock itself."""
    if folder is not None and Path(folder).is_dir():
        RunLock.acquire(Path(folder) / DRIVER_LOCK, what=what).release()


def release_driver_lock(lock: RunLock | None) -> None:
    if lock is not None:
        lock.release()
