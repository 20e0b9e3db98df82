"""One writer per run folder: ``RUN_DIR/.lock`` names its owner (process id, host, start time)
and is held with an advisory ``flock`` while the run writes. The operating system drops the
flock when the process dies, however it dies, so a lock left by a killed run is recognized as
stale and taken over; a live owner is refused. Where ``flock`` is missing or unsupported (some
network file systems) the owner's process id is checked instead, on its own host."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

LOCK = ".lock"


class RunFolderError(ValueError):
    """A run folder that is in use by another writer, or that cannot be written."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """``with RunLock(run_dir) as lock:`` holds the run folder; ``lock.took_over`` describes a stale
    lock that was replaced (None if there was none). Creates ``run_dir`` if needed."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK
        self.took_over: str | None = None
        self._fd: int | None = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        fd = self._open(create=True)
        try:
            owner = self._hold(fd)
            if owner:
                self.took_over = (f"took over the stale lock of process {owner.get('pid')} on host "
                                  f"{owner.get('host')!r} (started {owner.get('started')}; it is no longer running)")
            me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(me).encode(), 0)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def check_free(self) -> None:
        """Raise :class:`RunFolderError` when a live writer holds the folder now (creates nothing: a
        command checks this before its slow start, and takes the lock itself later)."""
        fd = self._open(create=False)
        if fd is not None:
            try:
                self._hold(fd)
            finally:
                os.close(fd)                                # drops the probe's flock

    def _open(self, create: bool) -> int | None:
        """The lock file's descriptor (None when it does not exist and ``create`` is False)."""
        try:
            if create:
                self.run_dir.mkdir(parents=True, exist_ok=True)
            return os.open(self.path, os.O_RDWR | (os.O_CREAT if create else 0), 0o644)
        except FileNotFoundError:
            if not create:
                return None
            raise RunFolderError(f"cannot write to the run folder {str(self.run_dir)!r}: no such folder") from None
        except OSError as err:
            raise RunFolderError(f"cannot write to the run folder {str(self.run_dir)!r}: {err.strerror}") from None

    def _hold(self, fd: int) -> dict:
        """The flock on ``fd`` (the previous owner, {} if none), or the error naming the live owner."""
        owner = self._owner(fd)
        if not self._flock(fd, owner):
            raise self._in_use(owner)
        return owner

    def release(self) -> None:
        """Clear the owner and drop the lock (the empty file stays: removing it would race a new writer)."""
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)
        finally:
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    def _in_use(self, owner: dict) -> RunFolderError:
        return RunFolderError(f"run folder {str(self.run_dir)!r} is in use by process {owner.get('pid')} on host "
                              f"{owner.get('host')!r} (since {owner.get('started')}); wait for it to finish or stop "
                              f"it, or choose another --run-dir")

    @staticmethod
    def _owner(fd: int) -> dict:
        raw = os.pread(fd, 4096, 0)
        try:
            owner = json.loads(raw) if raw.strip() else {}
        except ValueError:
            owner = {"pid": None, "host": None, "started": None}  # a torn lock file: no live owner wrote it
        return owner if isinstance(owner, dict) else {}

    def _flock(self, fd: int, owner: dict) -> bool:
        """True when this process now holds the lock."""
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                return False
            except OSError:  # flock unsupported here: fall back to the owner's process id
                pass
        if not owner or not isinstance(owner.get("pid"), int):
            return True
        if owner.get("host") != socket.gethostname():
            raise RunFolderError(f"run folder {str(self.run_dir)!r} is locked by process {owner['pid']} on host "
                                 f"{owner.get('host')!r}, which cannot be checked from here; if that run is gone, "
                                 f"delete {str(self.path)!r}")
        return not _alive(owner["pid"])
