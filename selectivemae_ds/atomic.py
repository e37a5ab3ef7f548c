"""Atomic, durable file writes: the one way this project replaces a file.

A reader sees either the old file or the complete new one, never half of it: the data
goes to a temporary file in the same directory, is flushed and fsynced, then renamed
over the target, and the directory entry is fsynced so the rename survives a power cut.
Files are created with the usual 0644-style permissions (umask applied), not mkstemp's 0600.
"""
from __future__ import annotations

import errno
import os
from pathlib import Path

from selectivemae_ds.errors import ConfigError


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """fsync a directory so renames and creations inside it are durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, *, mode: int = 0o666,
                       durable: bool = True) -> Path:
    """Replace ``path`` with ``data`` atomically and durably; returns the path.

    ``durable=False`` skips the fsyncs: still atomic (no reader or killed writer ever
    leaves half a file), for files that may be lost in a power cut (a cache's entries).

    ``mode`` is filtered by the process umask (0o666 -> 0644 under the usual 022).
    A full disk or a read-only directory raises :class:`OSError` with the path named
    (``ENOSPC``/``EROFS``/``EACCES`` kept as ``errno``) after removing the temporary file.
    """
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode & ~_umask())
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise OSError(e.errno, f"cannot write {target}: {os.strerror(e.errno or errno.EIO)}", str(target)) from e
    if durable:
        fsync_dir(target.parent)
    return target


def atomic_write_text(path: str | os.PathLike[str], text: str, *, mode: int = 0o666) -> Path:
    """:func:`atomic_write_bytes` of ``text`` encoded as UTF-8."""
    return atomic_write_bytes(path, text.encode("utf-8"), mode=mode)


def check_writable_dir(path: str | os.PathLike[str], what: str) -> Path:
    """Create ``path`` (and parents) if needed and check that files can be created in it.

    Raises :class:`ConfigError` naming ``what`` (e.g. ``--out``) when it is a file, read-only
    or cannot be created, before any long work starts.
    """
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ConfigError(f"{what}: {p} exists and is not a directory")
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"{what}: cannot create {p} ({os.strerror(e.errno or errno.EIO)})") from e
    if not os.access(p, os.W_OK | os.X_OK):
        raise ConfigError(f"{what}: {p} is not writable")
    return p
