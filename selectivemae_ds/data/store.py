"""Where a packed dataset lives: a local directory or an object store (``s3://bucket/prefix``).

The one seam between the dataset format (:mod:`selectivemae_ds.data.shards`) and remote
storage. Local paths never come here: the reader keeps its ``pread`` path for them.

Library: `obstore <https://developmentseed.org/obstore/>`_ (Python bindings of the Rust
``object_store`` crate, also a zarr v3 storage backend). It is synchronous (no asyncio event
loop thread in each DALI worker process, unlike s3fs), needs no botocore, serves ranged GETs
(``get_range``/``get_ranges``) and reads credentials and endpoint from the standard
environment: ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``,
``AWS_REGION``, ``AWS_ENDPOINT_URL`` (and the ``GOOGLE_*`` / ``AZURE_*`` variables for
``gs://`` and ``az://``). Nothing of that is ever read from our files.

Fork safety: a :class:`RemoteStore` pickles as its URL and options only; the client is made
lazily on first use in each process (and again when the process id changed, i.e. after a
fork), so DALI's spawned workers each open their own connections after unpickling.

Retries: obstore's own retry loop is switched off and :meth:`RemoteStore._call` retries every
error except "not found" ``attempts`` times in all, with exponential backoff, then raises a
:class:`RemoteAccessError` (a :class:`DataError`) naming the object and the last error. A
missing object raises :class:`ObjectMissing` at once.

Cache: :class:`BlockCache`, an optional local directory bounded in bytes (LRU by mtime),
filled atomically (temporary file + rename): a killed process leaves no torn entry, and the
bytes of a cached record are still checked by their crc32 before use.
"""
from __future__ import annotations

import errno
import fcntl
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TypeVar

from selectivemae_ds.atomic import atomic_write_bytes
from selectivemae_ds.errors import ConfigError, DataError

T = TypeVar("T")

REMOTE_SCHEMES = ("s3", "gs", "az", "abfs", "abfss", "http", "https")
DEFAULT_ATTEMPTS = 5
DEFAULT_BACKOFF_S = 0.5
MAX_BACKOFF_S = 10.0
CACHE_USAGE = "usage"
CACHE_OBJECTS = "objects"
CACHE_LOCK = ".lock"
# An eviction pass frees space down to this share of the bound, so a full cache is not
# rescanned on every fill.
CACHE_LOW_WATER = 0.9


def is_remote(path: str | os.PathLike[str]) -> bool:
    """True for ``scheme://...`` URLs of an object store this module serves (not local paths)."""
    text = os.fspath(path)
    scheme, sep, _rest = text.partition("://")
    return bool(sep) and scheme.lower() in REMOTE_SCHEMES


def join(root: str, *parts: str) -> str:
    """``root/part/...`` for URLs and keys (no os.path: keys always use ``/``)."""
    return "/".join([root.rstrip("/"), *(p.strip("/") for p in parts if p)])


class ObjectMissing(DataError):
    """The object does not exist in the store (never retried)."""


class RemoteAccessError(DataError):
    """Every attempt at a request (read, list or upload) failed; names the object and the last error."""


@dataclass(frozen=True)
class RemoteOptions:
    """How a dataset on an object store is read (``data.retries``, ``data.cache_*``)."""

    attempts: int = DEFAULT_ATTEMPTS
    """Tries per request in all (first try plus retries)."""
    backoff_s: float = DEFAULT_BACKOFF_S
    """Wait before the first retry; doubled per retry, capped at MAX_BACKOFF_S."""
    cache_dir: str = ""
    """Local directory of cached record bytes; "" for no cache."""
    cache_max_bytes: int = 0
    """Bound of the cache directory's contents in bytes."""

    def check(self) -> None:
        if not isinstance(self.attempts, int) or self.attempts < 1:
            raise ConfigError(f"data.retries: need >= 0 retries (attempts >= 1), got {self.attempts!r} attempts")
        if not (isinstance(self.backoff_s, (int, float)) and self.backoff_s >= 0):
            raise ConfigError(f"data.retry_backoff_s: need >= 0 seconds, got {self.backoff_s!r}")
        if self.cache_dir and self.cache_max_bytes <= 0:
            raise ConfigError("data.cache_max_gb: a bound > 0 is needed when data.cache_dir is set")


def _short(e: BaseException) -> str:
    """One line of an obstore error (their text appends a multi-line debug dump)."""
    text = str(e).split("\n\nDebug source", 1)[0].strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"


class RemoteStore:
    """An object store prefix (``s3://bucket/prefix``): whole and ranged reads, listing, puts."""

    def __init__(self, url: str, options: RemoteOptions | None = None,
                 sleep: Callable[[float], None] = time.sleep):
        self.url = url.rstrip("/")
        self.options = options or RemoteOptions()
        self.options.check()
        self._sleep = sleep
        self._client: Any = None
        self._pid = -1
        self.cache = BlockCache(self.options.cache_dir, self.options.cache_max_bytes) \
            if self.options.cache_dir else None

    def __str__(self) -> str:
        return self.url

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_client"], state["_pid"] = None, -1
        return state

    def _store(self) -> Any:
        if self._client is None or self._pid != os.getpid():
            from obstore.store import from_url

            endpoint = os.environ.get("AWS_ENDPOINT_URL", os.environ.get("AWS_ENDPOINT", ""))
            # Plain http only when the user pointed the endpoint at an http:// server (a
            # local MinIO or test server); retries are ours (RemoteStore._call).
            kwargs: dict[str, Any] = {"retry_config": {"max_retries": 0}}
            if self.url.startswith("s3://") and endpoint.startswith("http://"):
                kwargs["client_options"] = {"allow_http": True}
            try:
                self._client = from_url(self.url, **kwargs)
            except (ValueError, TypeError) as e:
                raise ConfigError(f"{self.url}: cannot open this object store URL ({_short(e)})") from e
            self._pid = os.getpid()
        return self._client

    def _call(self, what: str, key: str, fn: Callable[[Any], T]) -> T:
        """``fn(client)`` with bounded retries of network and server errors; ObjectMissing,
        ConfigError (credentials, a path or operation the store refuses: never retried) and
        RemoteAccessError name the object."""
        from obstore import exceptions as obx

        where = join(self.url, key)
        delay = self.options.backoff_s
        last: BaseException | None = None
        for attempt in range(self.options.attempts):
            if attempt:
                self._sleep(min(delay, MAX_BACKOFF_S))
                delay *= 2
            try:
                return fn(self._store())
            except (FileNotFoundError, obx.NotFoundError) as e:
                raise ObjectMissing(f"{where}: no such object ({what})") from e
            except (obx.PermissionDeniedError, obx.UnauthenticatedError) as e:
                raise ConfigError(f"{where}: {what} refused ({_short(e)}); check AWS_ACCESS_KEY_ID, "
                                  "AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN) or the bucket policy") from e
            except (obx.InvalidPathError, obx.NotSupportedError, obx.UnknownConfigurationKeyError) as e:
                raise ConfigError(f"{where}: {what} not possible on this store ({_short(e)})") from e
            except (obx.BaseError, OSError) as e:  # network (OSError: connection, timeout) and server errors
                last = e
        assert last is not None
        raise RemoteAccessError(f"{where}: {what} failed {self.options.attempts} time(s); last error: "
                              f"{_short(last)}") from last

    def get(self, key: str) -> bytes:
        import obstore

        return self._call("GET", key, lambda c: bytes(obstore.get(c, key).bytes()))

    def get_range(self, key: str, start: int, end: int) -> bytes:
        import obstore

        return self._call(f"GET bytes {start}-{end}", key,
                          lambda c: bytes(obstore.get_range(c, key, start=start, end=end)))

    def get_ranges(self, key: str, starts: list[int], ends: list[int]) -> list[bytes]:
        """Several ranges of one object (obstore coalesces close ranges into one request)."""
        import obstore

        if len(starts) == 1:
            return [self.get_range(key, starts[0], ends[0])]
        return self._call(f"GET {len(starts)} ranges", key,
                          lambda c: [bytes(b) for b in obstore.get_ranges(c, key, starts=starts, ends=ends)])

    def list(self, prefix: str) -> dict[str, int]:
        """{key: size} of the objects under ``prefix`` (keys relative to this store's URL)."""
        import obstore

        def run(c: Any) -> dict[str, int]:
            return {m["path"]: int(m["size"]) for batch in obstore.list(c, prefix.rstrip("/") + "/")
                    for m in batch}
        return self._call("LIST", prefix, run)

    def exists(self, key: str) -> bool:
        import obstore

        try:
            self._call("HEAD", key, lambda c: obstore.head(c, key))
        except ObjectMissing:
            return False
        return True

    def put(self, key: str, data: bytes) -> None:
        """One PUT: readers see the old object or the whole new one, never a part."""
        import obstore

        self._call("PUT", key, lambda c: obstore.put(c, key, data))

    def put_file(self, key: str, path: str | os.PathLike[str]) -> None:
        import obstore

        self._call("PUT", key, lambda c: obstore.put(c, key, Path(path)))

    def delete(self, key: str) -> None:
        import obstore

        self._call("DELETE", key, lambda c: obstore.delete(c, key))

    def cached(self, cache_key: str, size: int, fetch: Callable[[], bytes]) -> bytes:
        """``size`` bytes from the cache under ``cache_key`` when it holds them, else ``fetch()``
        (then cached). An entry of another size is dropped and fetched again."""
        if self.cache is None:
            return fetch()
        data = self.cache.get(cache_key)
        if data is not None and len(data) == size:
            return data
        if data is not None:
            self.cache.drop(cache_key)
        data = fetch()
        self.cache.put(cache_key, data)
        return data


class BlockCache:
    """A directory of cached byte blocks, its contents bounded by ``max_bytes`` (LRU).

    Shared by every process on the machine that reads the same dataset (DALI workers,
    ranks): the byte count lives in ``DIR/usage`` and changes only under ``flock`` on
    ``DIR/.lock``. A fill first reserves its size (evicting the least recently used
    entries, by mtime, while the total would pass the bound), then writes a temporary file
    and renames it into place, so a killed process leaves at most an over-count (corrected
    by the next eviction pass, which recounts the files) and never a torn entry.
    """

    def __init__(self, directory: str | os.PathLike[str], max_bytes: int):
        self.dir = Path(directory)
        self.max_bytes = int(max_bytes)
        self.objects = self.dir / CACHE_OBJECTS
        try:
            self.objects.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"data.cache_dir: cannot create {self.dir} ({os.strerror(e.errno or errno.EIO)})") from e

    def _path(self, key: str) -> Path:
        return self.objects / key

    def get(self, key: str) -> bytes | None:
        path = self._path(key)
        try:
            data = path.read_bytes()
            os.utime(path)  # the LRU clock
        except FileNotFoundError:
            return None
        return data

    def drop(self, key: str) -> None:
        """Remove an entry (the next eviction pass recounts the usage)."""
        fd = self._locked()
        try:
            self._path(key).unlink(missing_ok=True)
        finally:
            os.close(fd)

    def _locked(self) -> int:
        fd = os.open(self.dir / CACHE_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)
        return fd

    def _read_usage(self) -> int | None:
        try:
            return int((self.dir / CACHE_USAGE).read_text())
        except (FileNotFoundError, ValueError):
            return None

    def _write_usage(self, n: int) -> None:
        atomic_write_bytes(self.dir / CACHE_USAGE, str(n).encode(), durable=False)

    def _evict(self, need: int) -> int:
        """Recount the files, remove the least recently used until ``need`` more bytes fit
        under the low-water mark; returns the recounted usage. Called with the lock held:
        fills happen under it too, so a temporary file seen here is a killed fill's, removed."""
        entries = []
        for root, _dirs, files in os.walk(self.objects):
            for fn in files:
                p = Path(root) / fn
                if fn.endswith(".tmp"):
                    p.unlink(missing_ok=True)
                    continue
                try:
                    st = p.stat()
                except FileNotFoundError:
                    continue
                entries.append((st.st_mtime, st.st_size, p))
        total = sum(e[1] for e in entries)
        target = min(self.max_bytes - need, int(self.max_bytes * CACHE_LOW_WATER))
        for _mtime, size, p in sorted(entries):
            if total <= target:
                break
            p.unlink(missing_ok=True)
            total -= size
        return total

    def put(self, key: str, data: bytes) -> bool:
        """Store ``data`` under ``key`` unless it cannot fit; True when stored."""
        n = len(data)
        if n > self.max_bytes:
            return False
        path = self._path(key)
        fd = self._locked()
        try:
            if path.exists():
                return True
            usage = self._read_usage()
            if usage is None or usage + n > self.max_bytes:
                usage = self._evict(n)
            self._write_usage(usage + n)
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(path, data, durable=False)
        finally:
            os.close(fd)
        return True

    def usage(self) -> int:
        """Bytes of the cached entries right now (a recount, for tests and reports), taken under
        the cache lock: without it a fill in another process renames its temporary file away
        between the listing and the size."""
        fd = self._locked()
        try:
            return sum(os.path.getsize(os.path.join(r, f)) for r, _d, fs in os.walk(self.objects) for f in fs
                       if not f.endswith(".tmp"))
        finally:
            os.close(fd)

