"""CUDA-only checks (skipped without a GPU): GPU decode, bf16 steps, no host syncs.

Run on a GPU machine with ``python -m pytest -m gpu``.
"""
from __future__ import annotations

import pytest
import torch

from selectivemae_ds.data.config import DataConfig
from selectivemae_ds.data.pipeline import IMAGENET_STD, InputPipeline
from selectivemae_ds.models import ModelConfig, build_model, get_spec, method_names
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


@pytest.mark.parametrize("method", method_names())
def test_bf16_training_steps_are_finite(method):
    torch.manual_seed(0)
    model = build_model(ModelConfig(method=method, size="base")).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1.5e-4, betas=(0.9, 0.95), fused=True)
    imgs = torch.randn(16, 3, 224, 224, device="cuda")
    for step in range(3):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(imgs, progress=step / 3)
        out.loss.backward()
        grads = torch.stack([p.grad.float().norm() for p in model.parameters() if p.grad is not None])
        assert torch.isfinite(out.loss) and torch.isfinite(grads).all()
        opt.step()
        opt.zero_grad(set_to_none=True)


# Every method with its defaults, plus the options that change the step's graph.
SYNC_CASES = [(m, {}) for m in method_names()] + [
    ("selectivemae", {"similarity": "max", "with_pos": True, "init_select": "softmax", "target_select": "random"}),
    ("crossmae", {"weight_fm": True, "use_input": True}),
]


@pytest.mark.parametrize("method,options", SYNC_CASES)
@pytest.mark.parametrize("progress", [0.1, 0.375, 0.5, 0.9])
def test_model_step_has_no_host_sync(method, options, progress):
    method_cfg = get_spec(method).default_config()
    for key, value in options.items():
        setattr(method_cfg, key, value)
    model = build_model(ModelConfig(method=method, size="small"), method_cfg).cuda()
    imgs = torch.randn(8, 3, 224, 224, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        model(imgs, progress=progress).loss.backward()  # warm-up: lazy init may sync
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(imgs, progress=progress)
        out.loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(out.loss)
