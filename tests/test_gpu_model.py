"""CUDA-only checks of the models (skipped without a GPU): bf16 steps, no host syncs.

They import only torch, timm and the models (no DALI, zarr or DeepSpeed), so they run on a
GPU machine before any wheel bundle is installed (bench/gpu_call1.sh).
Run on a GPU machine with ``python -m pytest -m gpu tests/test_gpu_model.py``.
"""
from __future__ import annotations

import pytest
import torch

from selectivemae_ds.models import ModelConfig, build_model, get_spec, method_names

pytestmark = pytest.mark.gpu


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
