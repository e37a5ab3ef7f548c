"""CUDA-only checks of the input pipeline (skipped without a GPU): DALI mixed decode.

Needs DALI and zarr; the model's CUDA checks, which need neither, are in test_gpu_model.py.
Run on a GPU machine with ``python -m pytest -m gpu``.
"""
from __future__ import annotations

import pytest
import torch

from selectivemae_ds.data.config import DataConfig
from selectivemae_ds.data.pipeline import IMAGENET_STD, InputPipeline
from tests.shard_fixtures import build_dataset

pytestmark = pytest.mark.gpu


def _first_batch(root: str, decode: str, device: str) -> torch.Tensor:
    cfg = DataConfig(path=root, img_size=128, workers=1, device=decode)
    with InputPipeline(cfg, seed=3, global_batch=16, micro_batch=16, rank=0, world_size=1, device=device) as pipe:
        batch = next(pipe)
        assert batch.device.type == torch.device(device).type
        return batch.float().cpu()


def test_mixed_decode_matches_cpu_decode(tmp_path, assets_dir):
    root = str(build_dataset(tmp_path / "ds", assets_dir, count=32, shards=2))
    cpu = _first_batch(root, "cpu", "cpu")
    gpu = _first_batch(root, "gpu", "cuda:0")
    assert cpu.shape == gpu.shape == (16, 3, 128, 128)
    # Back to 8-bit gray levels: nvJPEG and libjpeg-turbo may round IDCT/upsampling
    # differently and the resizers differ in the last bit; a wrong crop or flip would
    # differ by tens of levels.
    levels = (cpu - gpu).abs() * 255 * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    assert levels.mean() < 2.0, levels.mean()
    assert torch.quantile(levels.flatten()[::7], 0.99) < 12.0


def test_gpu_pipeline_yields_bf16_on_device(tmp_path, assets_dir):
    root = str(build_dataset(tmp_path / "ds", assets_dir, count=32, shards=2))
    cfg = DataConfig(path=root, img_size=64, workers=1, device="gpu", dtype="bfloat16")
    with InputPipeline(cfg, seed=0, global_batch=8, micro_batch=8, rank=0, world_size=1, device="cuda:0") as pipe:
        batch = next(pipe)
    assert batch.is_cuda and batch.dtype == torch.bfloat16 and batch.shape == (8, 3, 64, 64)
