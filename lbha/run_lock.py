"""One daemon of each kind per run directory: an exclusive flock on `<run_dir>/<name>.pid`.

Taken before a daemon changes anything on the host (state files, IPVS, addresses, its
control socket), held for its whole life, released by the kernel when the process ends
however it ends, so a crash never leaves a stale lock. The file holds the owner's PID for
the refusal message; it is emptied on a clean exit, never deleted (deleting a lock file
another process has opened lets two processes hold "the" lock).
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from lbha.errors import LbhaError


class RunLockError(LbhaError):
    """Another daemon holds the run directory, or the directory cannot be used."""


def _owner(fd: int) -> str:
    try:
        text = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
    except OSError:
        return "unknown"
    return text if text.isdigit() else "unknown"


class RunLock:
    """Held from construction until `release()` (or the end of a `with` block).

    Raises RunLockError naming the running daemon's PID, or the directory that cannot be used.
    Should the owner be dropped without a release, closing its file releases the lock.
    """

    def __init__(self, run_dir: Path, name: str) -> None:
        self.path = run_dir / f"{name}.pid"
        try:
            run_dir.mkdir(parents=True, exist_ok=True, mode=0o755)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW,
                         0o644)
        except OSError as exc:
            raise RunLockError(f"cannot use {self.path} (paths.run_dir = {str(run_dir)!r}): "
                               f"{exc.strerror or exc}") from None
        self._file = os.fdopen(fd, "r+b", buffering=0)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = _owner(fd)
            self._file.close()
            raise RunLockError(
                f"another lbha {name} is already running with run_dir {run_dir} (pid {owner}, "
                f"holding {self.path}); stop it first, or give this one its own "
                "paths.run_dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        if not self._file.closed:
            os.ftruncate(self._file.fileno(), 0)
            self._file.close()

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()
