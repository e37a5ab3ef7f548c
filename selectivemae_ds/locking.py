"""Exclusive locks on output directories (a pack's ``--out``, a training ``run_dir``).

One mechanism for both: ``fcntl.flock`` on ``DIR/.lock``, held for the life of the
process. The kernel releases it when the holder exits or is killed (kill -9 included),
so a crashed run never leaves a stale lock and ``--resume auto`` / a rerun just works.
The lock file records who holds it (host, pid, command, start time) so the refusal
names the holder. flock works across processes on one machine and on NFSv4/Lustre
mounts that support it; on a file system without lock support the open raises and
the message says so.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from selectivemae_ds.errors import RunError

LOCK_NAME = ".lock"


class DirLock:
    """An exclusive lock on a directory; use as a context manager or call :meth:`release`."""

    def __init__(self, directory: str | os.PathLike[str], what: str, wait: float = 0.0) -> None:
        """Take the lock on ``directory`` (created if needed) for ``what`` (e.g. "smae-pack --out").

        ``wait`` seconds are spent retrying before giving up (0 = refuse at once). Raises
        :class:`RunError` naming the holder when another live process holds it.
        """
        self.path = Path(directory) / LOCK_NAME
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    os.close(self._fd)
                    self._fd = None
                    raise
                if time.monotonic() >= deadline:
                    holder = self.holder()
                    os.close(self._fd)
                    self._fd = None
                    raise RunError(f"{directory} is in use by another {what} ({holder}); "
                                   "wait for it to finish or use another directory") from None
                time.sleep(0.2)
        info = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "command": " ".join(sys.argv)}
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, (json.dumps(info) + "\n").encode(), 0)

    def holder(self) -> str:
        """Who holds the lock, as recorded in the lock file (best effort, for messages)."""
        return holder_of(self.path.parent)

    def release(self) -> None:
        """Release the lock (idempotent); the file stays, unlocked."""
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "DirLock":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def holder_of(directory: str | os.PathLike[str]) -> str:
    """Who holds (or last held) the lock of ``directory``, as its lock file records it (best
    effort, for messages)."""
    try:
        info = json.loads((Path(directory) / LOCK_NAME).read_text() or "{}")
    except (OSError, ValueError):
        return "holder unknown"
    return f"pid {info.get('pid')} on {info.get('host')} since {info.get('started')}: {info.get('command')}"
