"""The DALI input pipeline on real images: determinism, resume, world sizes, bad records.

One small dataset (44 real JPEG crops, 3 shards) and global batch 8: 5 global
batches per epoch with 4 records dropped, so a 12-batch stream crosses two epoch
boundaries. Every pipeline build spawns a DALI worker, so tests share an
uninterrupted reference stream computed once.
"""
from __future__ import annotations

import io
import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from selectivemae_ds.data import order
from selectivemae_ds.data.config import DataConfig
from selectivemae_ds.data.infobatch import InfoBatch
from selectivemae_ds.data.pipeline import (IMAGENET_MEAN, IMAGENET_STD, InputPipeline, _SampleSource,
                                           jpeg_size)
from selectivemae_ds.data.shards import ShardedDataset
from shard_fixtures import build_dataset, corrupt_record

N = 44
GLOBAL_BATCH = 8
SEED = 7
SIZE = 64
REF_BATCHES = 12  # global batches in the reference stream (epochs 0, 1 and 2 at 5 per epoch)


def _cfg(path: Path, **kw: object) -> DataConfig:
    base: dict[str, object] = {"path": str(path), "img_size": SIZE, "workers": 1, "decode_threads": 1,
                               "prefetch": 2, "device": "cpu"}
    base.update(kw)
    return DataConfig(**base)  # type: ignore[arg-type]


def _take(pipe: InputPipeline, global_batches: int) -> tuple[list[torch.Tensor], list[np.ndarray]]:
    """Pull whole global batches; returns per-global-batch images (B/ws, 3, S, S) and record indices."""
    images, indices = [], []
    for _ in range(global_batches):
        parts, idx = [], []
        for _ in range(pipe.accum):
            parts.append(next(pipe).clone())
            idx.append(pipe.last_indices)
        images.append(torch.cat(parts))
        indices.append(np.concatenate(idx))
    return images, indices


def _expected_indices(seed: int, g_abs: int) -> np.ndarray:
    """Record indices of absolute global batch ``g_abs`` by the order functions alone."""
    spe = order.steps_per_epoch(N, GLOBAL_BATCH)
    epoch, g = divmod(g_abs, spe)
    return order.epoch_permutation(seed, epoch, N)[g * GLOBAL_BATCH:(g + 1) * GLOBAL_BATCH]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory, assets_dir: Path) -> Path:
    return build_dataset(tmp_path_factory.mktemp("shards"), assets_dir, count=N, shards=3)


@pytest.fixture(scope="module")
def reference(dataset: Path) -> tuple[list[torch.Tensor], list[np.ndarray]]:
    """The uninterrupted world-size-1 stream, micro-batch 4 (accum 2)."""
    with InputPipeline(_cfg(dataset), seed=SEED, global_batch=GLOBAL_BATCH, micro_batch=4, rank=0,
                       world_size=1) as pipe:
        assert pipe.steps_per_epoch == 5 and pipe.dataset_len == N
        return _take(pipe, REF_BATCHES)


def test_stream_follows_the_global_order(reference: tuple[list[torch.Tensor], list[np.ndarray]]) -> None:
    _images, indices = reference
    for g, idx in enumerate(indices):
        assert np.array_equal(idx, _expected_indices(SEED, g)), f"global batch {g}"
    epoch0 = np.concatenate(indices[:5])
    assert len(set(epoch0.tolist())) == 40, "an epoch holds 40 distinct records; 4 are dropped"


def test_same_seed_gives_identical_batches(dataset: Path,
                                           reference: tuple[list[torch.Tensor], list[np.ndarray]]) -> None:
    ref_images, _ = reference
    with InputPipeline(_cfg(dataset, workers=2), seed=SEED, global_batch=GLOBAL_BATCH, micro_batch=4, rank=0,
                       world_size=1) as pipe:
        images, _ = _take(pipe, 6)
    for g in range(6):
        assert torch.equal(images[g], ref_images[g]), f"global batch {g} differs between two runs"
    with InputPipeline(_cfg(dataset), seed=SEED + 1, global_batch=GLOBAL_BATCH, micro_batch=4, rank=0,
                       world_size=1) as other:
        assert not torch.equal(next(other), ref_images[0][:4]), "another seed must give other batches"


@pytest.mark.parametrize("resume_at", [3, 5, 9], ids=["mid-epoch", "epoch-boundary", "second-epoch"])
def test_resume_equals_the_uninterrupted_stream(dataset: Path, resume_at: int,
                                               reference: tuple[list[torch.Tensor], list[np.ndarray]]) -> None:
    ref_images, ref_indices = reference
    with InputPipeline(_cfg(dataset), seed=SEED, global_batch=GLOBAL_BATCH, micro_batch=4, rank=0,
                       world_size=1) as pipe:
        state = {"seed": SEED, "global_batch": GLOBAL_BATCH, "dataset_len": N,
                 "dataset_fingerprint": pipe.dataset_fingerprint, "samples_seen": resume_at * GLOBAL_BATCH,
                 "substituted": 0}
        pipe.load_state_dict(state)
        assert pipe.samples_seen == resume_at * GLOBAL_BATCH and pipe.epoch == resume_at // 5
        images, indices = _take(pipe, REF_BATCHES - resume_at)
        assert pipe.state_dict()["samples_seen"] == REF_BATCHES * GLOBAL_BATCH
    for j, g in enumerate(range(resume_at, REF_BATCHES)):
        assert np.array_equal(indices[j], ref_indices[g])
        assert torch.equal(images[j], ref_images[g]), f"global batch {g} after resuming at {resume_at}"


def test_resume_from_a_saved_state_dict(dataset: Path,
                                        reference: tuple[list[torch.Tensor], list[np.ndarray]]) -> None:
    ref_images, _ = reference
    with InputPipeline(_cfg(dataset), seed=SEED, global_batch=GLOBAL_BATCH, micro_batch=8, rank=0,
                       world_size=1) as pipe:
        _take(pipe, 2)
        state = pipe.state_dict()
    assert state == {"seed": SEED, "global_batch": GLOBAL_BATCH, "dataset_len": N,
                     "dataset_fingerprint": pipe.dataset_fingerprint, "samples_seen": 16, "substituted": 0}
    with InputPipeline(_cfg(dataset), seed=SEED, global_batch=GLOBAL_BATCH, micro_batch=2, rank=0,
                       world_size=1) as resumed:
        resumed.load_state_dict(state)
        images, _ = _take(resumed, 1)
    assert torch.equal(images[0], ref_images[2]), "micro-batch size must not change what a global batch holds"


def test_world_size_2_ranks_partition_the_global_batches(
        dataset: Path, reference: tuple[list[torch.Tensor], list[np.ndarray]]) -> None:
    ref_images, ref_indices = reference
    steps = 6  # crosses the epoch boundary at 5
    per_rank = []
    for rank in range(2):
        with InputPipeline(_cfg(dataset), seed=SEED, global_batch=GLOBAL_BATCH, micro_batch=2, rank=rank,
                           world_size=2) as pipe:
            assert pipe.accum == 2
            per_rank.append(_take(pipe, steps))
    for g in range(steps):
        idx0, idx1 = per_rank[0][1][g], per_rank[1][1][g]
        assert not set(idx0.tolist()) & set(idx1.tolist()), f"ranks overlap in global batch {g}"
        assert np.array_equal(np.concatenate([idx0, idx1]), ref_indices[g])
        both = torch.cat([per_rank[0][0][g], per_rank[1][0][g]])
        assert torch.equal(both, ref_images[g]), f"ranks 0+1 differ from world size 1 in global batch {g}"


def test_resume_world_size_2_to_1(dataset: Path, reference: tuple[list[torch.Tensor], list[np.ndarray]]) -> None:
    ref_images, _ = reference
    with InputPipeline(_cfg(dataset), seed=SEED, global_batch=GLOBAL_BATCH, micro_batch=4, rank=1,
                       world_size=2) as pipe:
        _take(pipe, 4)
        state = pipe.state_dict()
    assert state["samples_seen"] == 4 * GLOBAL_BATCH
    with InputPipeline(_cfg(dataset), seed=SEED, global_batch=GLOBAL_BATCH, micro_batch=4, rank=0,
                       world_size=1) as single:
        single.load_state_dict(state)
        images, _ = _take(single, 3)
    for j, g in enumerate(range(4, 7)):
        assert torch.equal(images[j], ref_images[g]), f"global batch {g} after a 2 -> 1 resume"


def _reference_image(ds: ShardedDataset, seed: int, epoch: int, index: int, size: int) -> torch.Tensor:
    """The paper's transform with PIL on the same crop box and flip: (3, size, size) float32."""
    h, w = ds.shape(index)
    y, x, ch, cw = order.crop_params(seed, epoch, index, h, w)
    img = Image.open(io.BytesIO(ds.read(index))).convert("RGB").crop((x, y, x + cw, y + ch))
    img = img.resize((size, size), Image.Resampling.BICUBIC)
    if order.flip(seed, epoch, index):
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    t = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (t - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]


def test_output_shape_dtype_and_normalization(dataset: Path,
                                              reference: tuple[list[torch.Tensor], list[np.ndarray]]) -> None:
    ref_images, ref_indices = reference
    batch = ref_images[0]
    assert batch.shape == (GLOBAL_BATCH, 3, SIZE, SIZE) and batch.dtype == torch.float32
    assert batch.device.type == "cpu" and torch.isfinite(batch).all()
    ds = ShardedDataset(dataset)
    for b in range(GLOBAL_BATCH):
        expected = _reference_image(ds, SEED, 0, int(ref_indices[0][b]), SIZE)
        diff = (batch[b] - expected).abs()
        # DALI's ROI decode + antialiased cubic resize vs PIL's: ~0.003 apart (about one gray
        # level) here. A wrong box, axis order, flip or normalization gives errors of order 1.
        assert diff.mean() < 0.02, f"sample {b}: mean abs diff {diff.mean():.3f} to the PIL reference"
        assert torch.allclose(batch[b].mean((1, 2)), expected.mean((1, 2)), atol=0.05)

    with InputPipeline(_cfg(dataset, dtype="bfloat16"), seed=SEED, global_batch=GLOBAL_BATCH, micro_batch=4,
                       rank=0, world_size=1) as pipe:
        half = next(pipe)
    assert half.dtype == torch.bfloat16 and half.shape == (4, 3, SIZE, SIZE)
    assert torch.allclose(half.float(), batch[:4], atol=0.05)


def test_corrupted_records_are_substituted_counted_and_reported(
        tmp_path: Path, assets_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    perm = order.epoch_permutation(SEED, 0, N)
    junk, rotten = int(perm[3]), int(perm[21])  # both inside the kept part of epoch 0
    root = build_dataset(tmp_path / "bad", assets_dir, count=N, shards=3, junk=(junk,))
    corrupt_record(root, rotten)  # flipped heap bytes: crc32 mismatch
    cfg = _cfg(root)
    with caplog.at_level(logging.WARNING, logger="selectivemae_ds.data.pipeline"):
        with InputPipeline(cfg, seed=SEED, global_batch=GLOBAL_BATCH, micro_batch=4, rank=0, world_size=1) as pipe:
            images, _indices = _take(pipe, 5)  # one whole epoch
            state = pipe.state_dict()
    assert pipe.substituted == 2 == state["substituted"]
    assert sorted(i for i, _name in pipe.substituted_records) == sorted([junk, rotten])
    assert all(name.startswith("crop") for _i, name in pipe.substituted_records)
    assert all(torch.isfinite(x).all() for x in images)
    reported = [r.getMessage() for r in caplog.records if "failed its checks" in r.getMessage()]
    assert len(reported) == 2

    # The substitute is deterministic: the next sound record of the permutation.
    source = _SampleSource(str(root), seed=SEED, first_batch=0, global_batch=GLOBAL_BATCH, rank=0, world_size=1,
                           batches_per_epoch=5, scale=cfg.scale, ratio=cfg.ratio, hflip=cfg.hflip)
    for pos, bad in ((3, junk), (21, rotten)):
        _data, _h, _w, used, index = source.record(0, pos)
        assert (index, used) == (bad, int(perm[pos + 1]))
        assert source(SimpleNamespace(idx_in_epoch=pos))[4].tolist() == [pos, bad, used, 1]


def test_jpeg_header_check() -> None:
    buf = io.BytesIO()
    Image.new("RGB", (37, 21), (10, 200, 30)).save(buf, format="JPEG")
    good = buf.getvalue()
    assert jpeg_size(good) == (21, 37)
    assert jpeg_size(good[: len(good) // 2]) is None, "truncated file"
    assert jpeg_size(b"\x89PNG\r\n\x1a\n" + good[8:]) is None
    assert jpeg_size(good[:2] + b"\x00" * 40 + good[42:]) is None, "broken segment chain"


def test_configuration_errors(dataset: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not divisible by world_size \\* micro_batch = 2 \\* 3"):
        InputPipeline(_cfg(dataset), seed=0, global_batch=8, micro_batch=3, rank=0, world_size=2)
    with pytest.raises(ValueError, match="smaller than one global batch of 64"):
        InputPipeline(_cfg(dataset), seed=0, global_batch=64, micro_batch=8, rank=0, world_size=1)
    with pytest.raises(ValueError, match="data.path: .* does not exist"):
        InputPipeline(_cfg(tmp_path / "nowhere"), seed=0, global_batch=8, micro_batch=8, rank=0, world_size=1)
    with pytest.raises(ValueError, match="data.scale"):
        _cfg(dataset, scale=(0.5, 0.2)).validate()
    with pytest.raises(ValueError, match="data.dtype"):
        _cfg(dataset, dtype="float16").validate()
    with pytest.raises(ValueError, match="data.device: gpu decoding needs a CUDA training device"):
        InputPipeline(_cfg(dataset, device="gpu"), seed=0, global_batch=8, micro_batch=8, rank=0, world_size=1)

    pipe = InputPipeline(_cfg(dataset), seed=SEED, global_batch=GLOBAL_BATCH, micro_batch=4, rank=0, world_size=1)
    good = pipe.state_dict()
    for key, value in (("global_batch", 16), ("dataset_len", N + 1), ("seed", SEED + 1)):
        with pytest.raises(ValueError, match=f"{key} was {value} in the checkpoint"):
            pipe.load_state_dict({**good, key: value})
    with pytest.raises(ValueError, match="not a whole number of global batches"):
        pipe.load_state_dict({**good, "samples_seen": 12})
    next(pipe)
    with pytest.raises(ValueError, match="middle of a global batch"):
        pipe.state_dict()
    pipe.close()


@pytest.mark.gpu
def test_gpu_mixed_decode_matches_cpu(dataset: Path,
                                      reference: tuple[list[torch.Tensor], list[np.ndarray]]) -> None:
    ref_images, _ = reference
    with InputPipeline(_cfg(dataset, device="gpu"), seed=SEED, global_batch=GLOBAL_BATCH, micro_batch=8, rank=0,
                       world_size=1, device="cuda") as pipe:
        batch = next(pipe)
    assert batch.device.type == "cuda" and batch.shape == (GLOBAL_BATCH, 3, SIZE, SIZE)
    # nvJPEG and libjpeg-turbo IDCTs differ slightly; the box, flip and normalization may not.
    assert (batch.cpu() - ref_images[0]).abs().mean() < 0.05


_HOLD_A_PIPELINE = """
import sys, time
from selectivemae_ds.data.config import DataConfig
from selectivemae_ds.data.pipeline import InputPipeline

if __name__ == "__main__":
    cfg = DataConfig(path=sys.argv[1], img_size=64, workers=2, decode_threads=1, prefetch=1)
    pipe = InputPipeline(cfg, seed=0, global_batch=8, micro_batch=8, rank=0, world_size=1)
    next(pipe)
    print("ready", flush=True)
    time.sleep(600)
"""


def test_workers_die_with_a_killed_rank(tmp_path, dataset):
    """SIGKILL of the process that owns the pipeline (a killed rank) takes its DALI workers
    with it: left running they would hold the rank's output pipes open, and a remote
    launcher (pdsh/ssh) would never return."""
    import os
    import signal
    import subprocess
    import sys

    import psutil

    script = tmp_path / "hold.py"
    script.write_text(_HOLD_A_PIPELINE)
    proc = subprocess.Popen([sys.executable, str(script), str(dataset)], stdout=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parents[1])
    try:
        assert proc.stdout.readline().strip() == "ready"
        children = psutil.Process(proc.pid).children(recursive=True)
        workers = [c for c in children if "resource_tracker" not in " ".join(c.cmdline())]
        assert len(workers) >= 2
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        _gone, alive = psutil.wait_procs(children, timeout=20)
        assert not alive, f"still running after the rank died: {[c.cmdline() for c in alive]}"
    finally:
        if proc.poll() is None:
            proc.kill()


def _fake_losses(indices: np.ndarray, step: int) -> torch.Tensor:
    """A deterministic stand-in for the model's per-sample loss (varies by record and step)."""
    return torch.from_numpy(((indices * 37 + step * 11) % 23).astype(np.float32) / 10)


def _infobatch_run(pipe: InputPipeline, table: InfoBatch, steps: int, first_step: int = 0
                   ) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """``steps`` global batches with the table updated after each; per batch (epoch, indices, weights)."""
    out = []
    for step in range(first_step, first_step + steps):
        epoch = pipe.epoch
        _images, idx = _take(pipe, 1)
        weights = table.plan(epoch).weights[idx[0]]
        assert np.array_equal(pipe.last_global_indices, idx[0])
        table.record(_fake_losses(idx[0], step), pipe.last_global_indices)
        out.append((epoch, idx[0], weights))
    return out


def test_infobatch_prunes_each_epoch_and_resumes_mid_epoch(dataset: Path, tmp_path: Path) -> None:
    def table() -> InfoBatch:
        # delta 0.7 of 4 epochs: epochs 0-2 prune (0 has no scores yet), epoch 3 does not.
        return InfoBatch(n=N, seed=SEED, ratio=0.5, delta=0.7, total_epochs=4.0)

    straight_table = table()
    with InputPipeline(_cfg(dataset), seed=SEED, global_batch=GLOBAL_BATCH, micro_batch=4, rank=0,
                       world_size=1) as pipe:
        pipe.attach_infobatch(straight_table)
        straight = _infobatch_run(pipe, straight_table, 5)
        assert (pipe.epoch, pipe.schedule_position, pipe.epoch_progress) == (1, 5.0, 1.0)
        s1 = pipe.steps_in_epoch
        order1 = straight_table.plan(1).order
        assert s1 == len(order1) // GLOBAL_BATCH < 5, "epoch 1 is pruned"
        kept1 = np.isin(np.arange(N), order1)
        assert np.array_equal(order1, order.kept_order(order.epoch_permutation(SEED, 1, N), kept1))
        straight += _infobatch_run(pipe, straight_table, 1, first_step=5)
        assert pipe.schedule_position == pytest.approx(5 + 5 / s1) and pipe.epoch_progress == pytest.approx(1 + 1 / s1)
        state = pipe.state_dict()
        saved = straight_table.shard()
        while pipe.epoch < 4:
            straight += _infobatch_run(pipe, straight_table, 1, first_step=len(straight))
    steps = [sum(1 for e, _i, _w in straight if e == epoch) for epoch in range(4)]
    assert steps[0] == 5 and steps[1] == s1 and steps[2] < 5 and steps[3] == 5, steps
    assert state["epoch"] == 1 and state["batch_in_epoch"] == 1 and state["samples_seen"] == 6 * GLOBAL_BATCH
    assert straight_table.plan(3).pruned == 0, "epoch 3 is the unpruned tail (3 >= 0.7 * 4)"
    # Epoch 0 is the full permutation with weight 1; epoch 1 follows its pruned order, with rescaled records.
    assert np.array_equal(np.concatenate([i for e, i, _w in straight if e == 0]),
                          order.epoch_permutation(SEED, 0, N)[:40])
    assert all((w == 1).all() for e, _i, w in straight if e in (0, 3))
    assert any((w == 2).any() for e, _i, w in straight if e == 1)
    assert np.array_equal(np.concatenate([i for e, i, _w in straight if e == 1]), order1[:s1 * GLOBAL_BATCH])

    for name, data in saved.items():
        (tmp_path / name).write_bytes(data)
    resumed_table = table()
    resumed_table.load(tmp_path)
    with InputPipeline(_cfg(dataset), seed=SEED, global_batch=GLOBAL_BATCH, micro_batch=2, rank=0,
                       world_size=1) as pipe:
        pipe.attach_infobatch(resumed_table)
        pipe.load_state_dict(state)
        resumed = _infobatch_run(pipe, resumed_table, len(straight) - 6, first_step=6)
        assert pipe.epoch == 4
    for (ea, ia, wa), (eb, ib, wb) in zip(straight[6:], resumed):
        assert ea == eb and np.array_equal(ia, ib) and np.array_equal(wa, wb)
    torch.testing.assert_close(resumed_table.live, straight_table.live, rtol=0, atol=0, equal_nan=True)

    with InputPipeline(_cfg(dataset), seed=SEED, global_batch=GLOBAL_BATCH, micro_batch=4, rank=0,
                       world_size=1) as plain:
        with pytest.raises(ValueError, match="data.infobatch settings were"):
            plain.load_state_dict(state)
