"""Datasets on object storage: a local S3-compatible server (moto's server mode) on 127.0.0.1.

The fast tests upload a crop dataset object by object and read it back; the slow ones pack
the bundled images to the server, verify, train from it and resume.
"""
from __future__ import annotations

import io
import os
import sys
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator

import pytest

from data_prep.cli import main as cli_main
from data_prep.pack import PackConfig, ShardAssembler, default_staging, pack
from selectivemae_ds.data.config import DataConfig
from selectivemae_ds.data.shards import ShardedDataset, ShardFormatError
from selectivemae_ds.data.store import (
    BlockCache, ObjectMissing, RemoteAccessError, RemoteOptions, RemoteStore, is_remote,
)
from selectivemae_ds.errors import ConfigError
from shard_fixtures import build_dataset

moto_server = pytest.importorskip("moto.server", reason="moto[server] is not installed (requirements/base.txt)")

AWS_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT",
           "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE")


def _server() -> Any:
    srv = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    srv.start()
    return srv


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    srv = _server()
    host, port = srv.get_host_and_port()
    yield f"http://{host}:{port}"
    srv.stop()


def _use(monkeypatch: pytest.MonkeyPatch, endpoint: str) -> None:
    for key in AWS_ENV:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)


def _bucket(endpoint: str) -> tuple[str, Any]:
    import boto3

    name = f"smae-{uuid.uuid4().hex[:12]}"
    client = boto3.client("s3", endpoint_url=endpoint)
    client.create_bucket(Bucket=name)
    return name, client


@pytest.fixture
def s3(server: str, monkeypatch: pytest.MonkeyPatch) -> SimpleNamespace:
    """A fresh bucket on the module's server, the AWS_* environment pointing at it."""
    _use(monkeypatch, server)
    bucket, client = _bucket(server)
    return SimpleNamespace(endpoint=server, bucket=bucket, client=client, url=f"s3://{bucket}/ds")


@pytest.fixture(scope="module")
def local_dataset(tmp_path_factory: pytest.TempPathFactory, assets_dir: Path) -> Path:
    """44 real JPEG crops in 3 shards."""
    return build_dataset(tmp_path_factory.mktemp("s3_local") / "data", assets_dir, count=44, shards=3)


def upload(root: Path, url: str) -> RemoteStore:
    store = RemoteStore(url)
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.name.startswith("."):
            store.put(p.relative_to(root).as_posix(), p.read_bytes())
    return store


def contents(ds: ShardedDataset) -> list[tuple[str, tuple[int, int], int, bytes]]:
    return [(ds.source(i), ds.shape(i), ds.phash(i), ds.read(i)) for i in range(len(ds))]


def test_urls_are_told_from_paths() -> None:
    assert is_remote("s3://bucket/prefix") and is_remote("gs://b/p") and is_remote("S3://b")
    assert not is_remote("/data/s3://x") and not is_remote("data/set") and not is_remote("file.txt")


def test_remote_records_equal_the_local_ones(s3: SimpleNamespace, local_dataset: Path) -> None:
    upload(local_dataset, s3.url)
    remote = ShardedDataset(s3.url)
    assert str(remote.root) == s3.url and remote.manifest == ShardedDataset(local_dataset).manifest
    remote.read(0)
    assert "source/c/0" not in remote.shard(0)._group.store._store_dict  # fetched on first use only
    assert contents(remote) == contents(ShardedDataset(local_dataset))


def test_missing_manifest_and_missing_shard_are_named(s3: SimpleNamespace, local_dataset: Path) -> None:
    with pytest.raises(ShardFormatError, match=rf"s3://{s3.bucket}/nothing: no manifest.json"):
        ShardedDataset(f"s3://{s3.bucket}/nothing")
    upload(local_dataset, s3.url)
    for obj in s3.client.list_objects_v2(Bucket=s3.bucket, Prefix="ds/shard-00001.zarr/")["Contents"]:
        s3.client.delete_object(Bucket=s3.bucket, Key=obj["Key"])
    ds = ShardedDataset(s3.url)
    s, _j = ds.locate(len(ds) - 1)
    assert s == 2
    ds.read(0)
    with pytest.raises(ShardFormatError, match=rf"{s3.url}/shard-00001.zarr: shard listed in the manifest is "
                                               rf"missing \(no objects under {s3.url}/shard-00001.zarr/\)"):
        ds.read(int(ds._starts[1]))


def _overwrite(s3: SimpleNamespace, key: str, change: Any) -> None:
    body = s3.client.get_object(Bucket=s3.bucket, Key=key)["Body"].read()
    s3.client.put_object(Bucket=s3.bucket, Key=key, Body=change(body))


def test_corrupt_objects_are_refused_by_name(s3: SimpleNamespace, local_dataset: Path) -> None:
    upload(local_dataset, s3.url)
    # An index array changed in place: same size, another value -> the manifest's digest catches it.
    _overwrite(s3, "ds/shard-00001.zarr/offsets/c/0", lambda b: b[:-8] + (int.from_bytes(b[-8:], "little") + 1)
               .to_bytes(8, "little"))
    # A heap file overwritten with other bytes of the same length -> its chunk index checksum fails.
    _overwrite(s3, "ds/shard-00002.zarr/bytes/c/0", lambda b: bytes(len(b)))
    # The group's metadata replaced by something that is not JSON -> the shard is unreadable.
    s3.client.put_object(Bucket=s3.bucket, Key="ds/shard-00000.zarr/zarr.json", Body=b"{not json")
    ds = ShardedDataset(s3.url)
    with pytest.raises(ShardFormatError, match=rf"^{s3.url}/shard-00000.zarr: unreadable shard \("):
        ds.read(0)
    with pytest.raises(ShardFormatError, match=rf"^{s3.url}/shard-00001.zarr: index digest does not match the "
                                               r"manifest \(index corrupted\)$"):
        ds.read(int(ds._starts[1]))
    with pytest.raises(ShardFormatError, match=rf"^{s3.url}/shard-00002.zarr: heap file c/0 has a damaged "
                                               r"chunk index$"):
        ds.read(int(ds._starts[2]))


def _own_server_with(local_dataset: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Any, str]:
    """A server of the test's own (the test stops it), holding ``local_dataset`` at the URL returned."""
    srv = _server()
    host, port = srv.get_host_and_port()
    _use(monkeypatch, f"http://{host}:{port}")
    bucket, _client = _bucket(f"http://{host}:{port}")
    url = f"s3://{bucket}/ds"
    upload(local_dataset, url)
    return srv, url


def test_stopped_server_is_retried_then_a_data_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      local_dataset: Path) -> None:
    srv, url = _own_server_with(local_dataset, monkeypatch)
    ds = ShardedDataset(url, remote=RemoteOptions(attempts=3, backoff_s=0.01))
    waits: list[float] = []
    ds.root._sleep = waits.append
    ds.read(0)
    srv.stop()
    sh = ds.shard(0)
    a, b = int(sh.offsets[0]), int(sh.offsets[1])
    with pytest.raises(RemoteAccessError, match=rf"^{url}/shard-00000.zarr/bytes/c/0: GET bytes {a}-{b} failed 3 "
                                              r"time\(s\); last error: \w+Error: .*error sending request"):
        ds.read(0)
    assert waits == [0.01, 0.02]  # backoff doubles between the attempts
    with pytest.raises(RemoteAccessError, match=rf"^{url}/shard-00001.zarr: LIST failed 3 time\(s\)"):
        ds.read(int(ds._starts[1]))


def test_errors_are_retried_or_refused_by_kind() -> None:
    from obstore import exceptions as obx

    waits: list[float] = []
    store = RemoteStore("s3://bucket/x", RemoteOptions(attempts=3, backoff_s=0.25), sleep=waits.append)
    store._client, store._pid = object(), os.getpid()
    calls: list[str] = []

    def failing(exc: BaseException) -> Any:
        def fn(_client: Any) -> bytes:
            calls.append(type(exc).__name__)
            raise exc
        return fn

    with pytest.raises(ConfigError, match=r"^s3://bucket/x/k: GET refused \(PermissionDeniedError: denied\); "
                                          r"check AWS_ACCESS_KEY_ID"):
        store._call("GET", "k", failing(obx.PermissionDeniedError("denied")))
    with pytest.raises(ObjectMissing, match=r"^s3://bucket/x/k: no such object \(GET\)$"):
        store._call("GET", "k", failing(FileNotFoundError("gone")))
    assert calls == ["PermissionDeniedError", "FileNotFoundError"] and waits == []
    with pytest.raises(RemoteAccessError, match=r"^s3://bucket/x/k: GET failed 3 time\(s\); last error: "
                                              r"ConnectionResetError: reset$"):
        store._call("GET", "k", failing(ConnectionResetError("reset")))
    assert waits == [0.25, 0.5]
    with pytest.raises(KeyError):  # anything else is a bug: raised as it is, not retried
        store._call("GET", "k", failing(KeyError("bug")))
    assert calls[-1] == "KeyError" and len(calls) == 6


def test_cache_serves_reads_and_never_exceeds_its_bound(s3: SimpleNamespace, tmp_path: Path,
                                                        local_dataset: Path) -> None:
    upload(local_dataset, s3.url)
    local = ShardedDataset(local_dataset)
    total = sum(len(local.read(i)) for i in range(len(local)))
    bound = total // 2
    cache_dir = tmp_path / "cache"
    opts = RemoteOptions(cache_dir=str(cache_dir), cache_max_bytes=bound)
    ds = ShardedDataset(s3.url, remote=opts)
    cache = ds.root.cache
    assert cache is not None
    for _round in range(2):
        for i in range(len(ds)):
            assert ds.read(i) == local.read(i)
            assert cache.usage() <= bound
    assert cache.usage() > bound // 2
    # A record still cached is served without the network: the server never sees the request.
    last = len(ds) - 1
    s, j = ds.locate(last)
    sh = ds.shard(s)
    key = f"{ds.manifest['shards'][s]['index_sha256']}/{int(sh.offsets[j])}-{int(sh.offsets[j + 1])}"
    assert cache.get(key) == local.read(last)
    ds.root._client = object()  # any network call now fails
    assert ds.read(last) == local.read(last)
    # A second cache on the same directory (another worker process) sees the same bound and entries.
    other = BlockCache(cache_dir, bound)
    assert other.get(key) == local.read(last)
    assert other.put("x/big", bytes(bound)) and cache.usage() <= bound and other.get(key) is None


def test_cache_fill_is_atomic_and_a_killed_fill_is_cleaned(tmp_path: Path) -> None:
    cache = BlockCache(tmp_path / "c", 1000)
    # What a fill killed between its reservation and its rename leaves: a temporary file and an over-count.
    (cache.objects / "d").mkdir()
    (cache.objects / "d" / ".0-10.4242.tmp").write_bytes(b"x" * 300)
    (cache.dir / "usage").write_text("900")
    assert cache.get("d/0-10") is None
    assert cache.put("d/10-20", b"y" * 400)
    assert sorted(p.name for p in (cache.objects / "d").iterdir()) == ["10-20"]
    assert int((cache.dir / "usage").read_text()) == 400 == cache.usage()
    assert not cache.put("d/huge", b"z" * 1001)


def _fill_cache(directory: str, bound: int, seed: int) -> int:
    """Fill a shared cache from another process; returns the largest usage it saw."""
    import random

    cache, rng, seen = BlockCache(directory, bound), random.Random(seed), 0
    for i in range(150):
        cache.put(f"p{seed}/{i}", bytes(rng.randrange(100, 2500)))
        if i % 10 == 0:
            seen = max(seen, cache.usage())
    return seen


def test_cache_bound_holds_with_processes_filling_it_at_once(tmp_path: Path) -> None:
    import multiprocessing

    bound = 20_000
    with multiprocessing.get_context("spawn").Pool(3) as pool:
        seen = pool.starmap(_fill_cache, [(str(tmp_path / "c"), bound, s) for s in range(3)])
    cache = BlockCache(tmp_path / "c", bound)
    assert max(seen) <= bound and 0.5 * bound < cache.usage() <= bound
    assert int((tmp_path / "c" / "usage").read_text()) >= cache.usage()  # never an under-count


def test_data_config_accepts_a_url_and_checks_the_remote_keys() -> None:
    DataConfig(path="s3://bucket/data").validate()
    with pytest.raises(ConfigError, match="data.cache_max_gb: a bound > 0 is needed when data.cache_dir is set"):
        DataConfig(path="s3://bucket/data", cache_dir="/tmp/c").validate()
    with pytest.raises(ConfigError, match="data.retries: need an integer >= 0, got -1"):
        DataConfig(path="s3://bucket/data", retries=-1).validate()
    opts = DataConfig(path="s3://b/d", cache_dir="/c", cache_max_gb=2.5, retries=2, retry_backoff_s=0.1).remote_options()
    assert opts == RemoteOptions(attempts=3, backoff_s=0.1, cache_dir="/c", cache_max_bytes=2_500_000_000)


def test_parts_and_merge_refuse_an_object_store(capsys: pytest.CaptureFixture[str], assets_dir: Path) -> None:
    assert cli_main([str(assets_dir), "--out", "s3://bucket/ds", "--part", "0/2", "--quiet"]) == 2
    assert "--part: a multi-node pack writes to a shared file system, not an object store" in capsys.readouterr().err
    assert cli_main(["merge", "s3://bucket/ds"]) == 2
    assert "smae-pack merge: s3://bucket/ds is an object store URL" in capsys.readouterr().err


def _run_cli(argv: list[str]) -> tuple[int, str]:
    buf = io.StringIO()
    stdout, sys.stdout = sys.stdout, buf
    try:
        rc = cli_main(argv)
    finally:
        sys.stdout = stdout
    return rc, buf.getvalue()


@pytest.mark.slow
def test_pack_to_s3_verify_and_read_back_equal_to_a_local_pack(s3: SimpleNamespace, tmp_path: Path,
                                                                assets_dir: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    local = tmp_path / "local"
    pack(PackConfig(sources=[str(assets_dir)], out=local, progress=False, images_per_shard=4))
    staging = tmp_path / "staging"
    rc, printed = _run_cli([str(assets_dir), "--out", s3.url, "--staging", str(staging), "--workers", "1",
                            "--images-per-shard", "4", "--quiet"])
    assert rc == 0 and f"output: {s3.url}" in printed and "packed 13 records" in printed
    assert sorted(p.name for p in staging.iterdir()) == [".lock"]  # everything was uploaded
    remote_manifest = s3.client.get_object(Bucket=s3.bucket, Key="ds/manifest.json")["Body"].read()
    assert remote_manifest == (local / "manifest.json").read_bytes()
    assert contents(ShardedDataset(s3.url)) == contents(ShardedDataset(local))
    rc, printed = _run_cli(["verify", s3.url])
    assert rc == 0 and f"verify {s3.url}: OK, 13 records in 4 shard(s)" in printed
    rc, printed = _run_cli([str(assets_dir), "--out", s3.url, "--staging", str(staging), "--workers", "1",
                            "--images-per-shard", "4", "--quiet"])
    assert rc == 0 and "already complete" in printed
    # A damaged record is listed by verify with its shard and record.
    _overwrite(s3, "ds/shard-00001.zarr/bytes/c/0", lambda b: b[:100] + bytes(50) + b[150:])
    capsys.readouterr()
    assert cli_main(["verify", s3.url]) == 3
    err = capsys.readouterr().err
    assert f"verify {s3.url}: FAILED, 1 problem(s)" in err
    assert "shard-00001.zarr: record 4 (local 0, source " in err and "fails its crc32 check" in err


@pytest.mark.slow
def test_pack_to_s3_killed_after_a_shard_resumes_to_the_same_dataset(s3: SimpleNamespace, tmp_path: Path,
                                                                      assets_dir: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # the default staging goes under TMPDIR
    local = tmp_path / "local"
    pack(PackConfig(sources=[str(assets_dir)], out=local, progress=False, images_per_shard=4))
    cfg = dict(sources=[str(assets_dir)], out=s3.url, progress=False, images_per_shard=4)
    finalize = ShardAssembler._finalize
    calls = []

    def dies_at_the_second(self: ShardAssembler, current_batch: int) -> None:
        calls.append(current_batch)
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed while the second shard is being finalized
        finalize(self, current_batch)

    monkeypatch.setattr(ShardAssembler, "_finalize", dies_at_the_second)
    with pytest.raises(KeyboardInterrupt):
        pack(PackConfig(**cfg))
    keys = {o["Key"] for o in s3.client.list_objects_v2(Bucket=s3.bucket, Prefix="ds/")["Contents"]}
    assert "ds/manifest.json" not in keys and "ds/shard-00000.zarr/zarr.json" in keys
    assert not any(k.startswith("ds/shard-00001.zarr/") for k in keys)
    with pytest.raises(ShardFormatError, match="no manifest.json"):
        ShardedDataset(s3.url)  # readers see nothing until the manifest is uploaded
    monkeypatch.setattr(ShardAssembler, "_finalize", finalize)
    doc = pack(PackConfig(**cfg))
    assert doc["run"] == "resumed run" and doc["packed"] == 13
    assert contents(ShardedDataset(s3.url)) == contents(ShardedDataset(local))
    staging = default_staging(s3.url)
    assert staging.parent == tmp_path / "tmp" / "smae-pack-staging"
    assert sorted(p.name for p in staging.iterdir()) == [".lock"]


@pytest.mark.slow
def test_train_from_s3_and_resume_equal_to_a_straight_run(s3: SimpleNamespace, tmp_path: Path,
                                                          launch_dataset: Path) -> None:
    from tests.launch import logged, pretrain

    upload(launch_dataset, s3.url)
    cache = ["--set", f"data.cache_dir={tmp_path / 'cache'}", "--set", "data.cache_max_gb=0.001"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    pretrain(straight, s3.url, "cpu_smoke.json", *cache, ranks=1)
    mid = straight / "checkpoints" / "step_00000002"
    r = pretrain(resumed, s3.url, "cpu_smoke.json", *cache, "--resume", str(mid), ranks=1)
    assert "[resume] step=2" in r.stdout
    a, b = logged(straight), logged(resumed)
    assert sorted(b) == [3, 4]
    for step in (3, 4):
        assert b[step]["samples_seen"] == a[step]["samples_seen"]
        assert b[step]["loss"] == pytest.approx(a[step]["loss"], rel=1e-6, abs=1e-7)
    assert 0 < BlockCache(tmp_path / "cache", 1_000_000).usage() <= 1_000_000
    resolved = (straight / "config.toml").read_text()
    assert f'path = "{s3.url}"' in resolved and "AWS_SECRET" not in resolved and "testing" not in resolved


@pytest.mark.slow
def test_pipeline_stops_with_a_data_error_when_the_store_stays_unreachable(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, local_dataset: Path) -> None:
    from selectivemae_ds.data.pipeline import InputPipeline

    srv, url = _own_server_with(local_dataset, monkeypatch)
    cfg = DataConfig(path=url, img_size=64, workers=1, decode_threads=1, prefetch=1, device="cpu", retries=2,
                     retry_backoff_s=0.01)
    with InputPipeline(cfg, seed=1, global_batch=4, micro_batch=4, rank=0, world_size=1) as pipe:
        assert next(pipe).shape == (4, 3, 64, 64)
        srv.stop()
        with pytest.raises(RemoteAccessError, match=rf"^{url}/shard-0000\d.zarr\S*: (GET|LIST)\b.* failed 3 time\(s\); "
                                                  r"last error: .*\(in a loader worker process\)$"):
            for _ in range(len(ShardedDataset(local_dataset))):
                next(pipe)
