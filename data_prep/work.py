"""The resumable work directory ``OUT/.smae-pack-work/``.

Contents (every file is written by :func:`selectivemae_ds.atomic.atomic_write_bytes`: a
temporary name, fsync, rename, fsync of the directory, so a kill or a power cut at any
moment leaves either the old state or the new one, never half a file):

- ``fingerprint.json``: hash of the inputs (names, sizes, mtimes) and of every option
  that changes the output. A rerun with anything different is refused.
- ``batches/NNN/b-NNNNNNNN.bin``: the encoded records of one batch of inputs, concatenated;
- ``batches/NNN/b-NNNNNNNN.json``: the batch's outcome per input (reason, sliced, and per
  record: source, height, width, phash, byte length) and the payload's length and crc32.
  Written *after* the payload: the
  JSON file is the batch's commit point. Payloads are deleted once every record in them
  sits in a finalized shard; the JSON stays, because deduplication of later records on a
  rerun needs the hashes of all earlier ones.
- ``shards.json``: the shards finalized so far, in order (name, count, bytes, digest).

The directory is removed after ``manifest.json`` (the dataset's commit point) is written.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import zlib
from pathlib import Path
from typing import Any

from selectivemae_ds.atomic import atomic_write_bytes
from selectivemae_ds.errors import DataError

WORK_DIR_NAME = ".smae-pack-work"
BATCHES_PER_SUBDIR = 1000


def write_json(path: Path, doc: Any) -> None:
    """``doc`` as canonical JSON through the project's one atomic, durable write."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, (json.dumps(doc, sort_keys=True, separators=(",", ":")) + "\n").encode("utf-8"))


def fingerprint_of(doc: dict[str, Any]) -> str:
    """sha256 of a JSON document in canonical form."""
    return hashlib.sha256(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode("utf-8")).hexdigest()


class WorkDir:
    """Accessors for the files of one work directory."""

    def __init__(self, out_dir: Path):
        self.root = out_dir / WORK_DIR_NAME

    def exists(self) -> bool:
        return self.root.is_dir()

    @property
    def fingerprint_path(self) -> Path:
        return self.root / "fingerprint.json"

    @property
    def shards_path(self) -> Path:
        return self.root / "shards.json"

    def read_fingerprint(self) -> str | None:
        try:
            return str(json.loads(self.fingerprint_path.read_text(encoding="utf-8"))["fingerprint"])
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise DataError(f"{self.fingerprint_path} is damaged ({e}); rerun with --restart") from e

    def create(self, fingerprint: str, description: dict[str, Any]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        write_json(self.fingerprint_path, {"fingerprint": fingerprint, "description": description})

    def _batch_base(self, batch: int) -> Path:
        return self.root / "batches" / f"{batch // BATCHES_PER_SUBDIR:03d}" / f"b-{batch:08d}"

    def meta_path(self, batch: int) -> Path:
        return self._batch_base(batch).with_suffix(".json")

    def payload_path(self, batch: int) -> Path:
        return self._batch_base(batch).with_suffix(".bin")

    def write_batch(self, batch: int, meta: dict[str, Any], payload: bytes) -> None:
        """Persist one batch: payload first, then the meta file that commits it.

        The meta records the payload's length and crc32, checked by :meth:`read_payload`, so
        a payload damaged on disk (or edited by hand) is recomputed rather than packed.
        """
        meta["payload"] = {"bytes": len(payload), "crc32": zlib.crc32(payload)}
        path = self.payload_path(batch)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, payload)
        write_json(self.meta_path(batch), meta)

    def read_meta(self, batch: int) -> dict[str, Any] | None:
        path = self.meta_path(batch)
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, UnicodeDecodeError):
            # Cannot happen through atomic writes; a damaged file (disk trouble, a user
            # edit) is simply recomputed: the batch is a pure function of its inputs.
            path.unlink()
            return None

    def read_payload(self, batch: int, meta: dict[str, Any]) -> bytes:
        """The batch's payload; FileNotFoundError when it is missing or fails its check."""
        data = self.payload_path(batch).read_bytes()
        want = meta["payload"]
        if len(data) != want["bytes"] or zlib.crc32(data) != want["crc32"]:
            raise FileNotFoundError(f"{self.payload_path(batch)} does not match its meta")
        return data

    def drop_payload(self, batch: int) -> None:
        self.payload_path(batch).unlink(missing_ok=True)

    def read_shards(self) -> list[dict[str, Any]]:
        """Finalized shards as their manifest entries (plain dicts: this module stays free
        of the Zarr import so worker processes start fast)."""
        try:
            doc = json.loads(self.shards_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return []
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{self.shards_path} is damaged ({e}); rerun with --restart") from e
        return list(doc["shards"])

    def write_shards(self, shards: list[dict[str, Any]]) -> None:
        write_json(self.shards_path, {"shards": shards})

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=False)
