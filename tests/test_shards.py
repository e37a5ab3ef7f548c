"""The shard format's reader: the direct heap path against zarr, and damaged files."""
import json
import os

import numpy as np
import pytest

from selectivemae_ds.data import shards
from selectivemae_ds.data.shards import ShardedDataset, ShardFormatError, ShardWriter, shard_name, write_manifest


@pytest.fixture
def multi_file_dataset(tmp_path, monkeypatch):
    """Records straddling inner chunks and outer shard files, and one all-zero chunk."""
    monkeypatch.setattr(shards, "HEAP_SHARD_BYTES", 4 * shards.HEAP_CHUNK_BYTES)
    rng = np.random.default_rng(0)
    sizes = [300_000, 5, 262_144, 700_000, 17, 1_000_000, 123_456]
    records = [rng.integers(1, 256, n, dtype=np.uint8).tobytes() for n in sizes]
    records.append(bytes(3 * shards.HEAP_CHUNK_BYTES))  # whole chunks of fill value: zarr writes none
    w = ShardWriter(tmp_path, shard_name(0))
    for k, data in enumerate(records):
        w.add(data, 1, 1, k, f"r{k}")
    write_manifest(tmp_path, [w.finalize()], {}, {})
    return tmp_path, records


def test_direct_reads_equal_zarr_reads(multi_file_dataset):
    root, records = multi_file_dataset
    ds = ShardedDataset(root)
    sh = ds.shard(0)
    assert sh.direct is not None and sh.direct.per_shard == 4
    assert len(os.listdir(root / shard_name(0) / "bytes" / "c")) > 2  # several outer files
    for i, data in enumerate(records):
        assert ds.read(i) == data
        a, b = int(sh.offsets[i]), int(sh.offsets[i + 1])
        assert sh.heap[a:b].tobytes() == data


def test_damaged_chunk_index_is_refused(multi_file_dataset):
    root, _records = multi_file_dataset
    heap_file = root / shard_name(0) / "bytes" / "c" / "0"
    raw = bytearray(heap_file.read_bytes())
    raw[-10] ^= 0xFF
    heap_file.write_bytes(bytes(raw))
    with pytest.raises(ShardFormatError, match=r"shard-00000.zarr: heap file c/0 has a damaged chunk index"):
        ShardedDataset(root).read(0)


def test_unexpected_heap_metadata_falls_back_to_zarr(multi_file_dataset):
    root, records = multi_file_dataset
    meta_path = root / shard_name(0) / "bytes" / "zarr.json"
    meta = json.loads(meta_path.read_text())
    # Still a valid array for zarr, but not byte-for-byte what this writer produces.
    meta["codecs"][0]["configuration"]["codecs"] = [{"name": "bytes", "configuration": {"endian": "little"}}]
    meta_path.write_text(json.dumps(meta))
    ds = ShardedDataset(root)
    assert ds.shard(0).direct is None
    assert ds.read(3) == records[3]


def test_unknown_schema_and_bad_offsets_are_refused(multi_file_dataset):
    root, _records = multi_file_dataset
    manifest = json.loads((root / "manifest.json").read_text())
    (root / "manifest.json").write_text(json.dumps({**manifest, "schema": 2}))
    with pytest.raises(ShardFormatError, match="unknown schema 2"):
        ShardedDataset(root)
    (root / "manifest.json").write_text(json.dumps(manifest))
    import zarr

    offsets = zarr.open_array(str(root / shard_name(0) / "offsets"), mode="r+")
    values = offsets[:]
    values[2], values[3] = values[3], values[2]
    offsets[:] = values
    with pytest.raises(ShardFormatError, match="index digest does not match"):
        ShardedDataset(root).read(0)


def _two_shard_dataset(root):
    infos = []
    for s in range(2):
        w = ShardWriter(root, shard_name(s))
        for k in range(4):
            w.add(bytes([s * 16 + k + 1]) * (10 + k), 8, 8, k, f"s{s}r{k}")
        infos.append(w.finalize())
    write_manifest(root, infos, {}, {})


def test_reader_and_verify_report_the_same_shard_problem(tmp_path, capsys):
    """One check (shards.check_shard) for both: the reader's error is verify's line with the
    dataset path in front, naming shard, global and local record."""
    from data_prep.cli import main as pack_main

    _two_shard_dataset(tmp_path)
    import zarr
    group = zarr.open_group(str(tmp_path / shard_name(1)), mode="r+")
    off = group["offsets"][:]
    off[2] = off[1]
    group["offsets"][:] = off
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["shards"][1]["index_sha256"] = shards.index_digest({k: np.asarray(group[k][:]) for k in shards.INDEX_ARRAYS})
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))

    index, problems = shards.check_shard(tmp_path, manifest["shards"][1])
    assert index is None
    assert problems == [shards.ShardProblem(shard_name(1), "inconsistent offsets: [10, 10) do not increase", 1)]
    with pytest.raises(ShardFormatError) as e:
        ShardedDataset(tmp_path).read(6)
    assert pack_main(["verify", str(tmp_path)]) == 3
    line = "shard-00001.zarr: record 5 (local 1): inconsistent offsets: [10, 10) do not increase"
    assert str(e.value) == f"{tmp_path}/{line}"
    assert f"  {line}\n" in capsys.readouterr().err


def test_dataset_is_written_with_the_usual_permissions(tmp_path):
    """The manifest was created by mkstemp (0600) and each shard directory by mkdtemp (0700):
    other users of a shared dataset could not read it."""
    old = os.umask(0o022)
    try:
        _two_shard_dataset(tmp_path)
    finally:
        os.umask(old)
    assert (tmp_path / "manifest.json").stat().st_mode & 0o777 == 0o644
    for s in range(2):
        assert (tmp_path / shard_name(s)).stat().st_mode & 0o777 == 0o755
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
