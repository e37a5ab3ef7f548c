"""The paper's lr rule, warmup + cosine per step, and the progress that drives PSTS."""
from __future__ import annotations

import math
from pathlib import Path

import pytest

from selectivemae_ds.config import load_config
from selectivemae_ds.models.methods.selectivemae import psts_stage_name
from selectivemae_ds.schedules import lr_at, peak_lr, progress_at

REPO = Path(__file__).resolve().parents[1]


def recipe(tmp_path: Path, name: str, *extra: str):
    return load_config(REPO / "configs" / f"{name}.toml", [f"data.path={tmp_path}", *extra])


def test_peak_lr_follows_the_paper(tmp_path: Path) -> None:
    smae = recipe(tmp_path, "selectivemae_vitb_800ep")
    assert peak_lr(smae) == pytest.approx(1.5e-4 * 1024 / 256 * 0.25 / 0.85)
    assert peak_lr(recipe(tmp_path, "selectivemae_vitb_800ep", "optim.scale_by_decode=false")) == pytest.approx(6e-4)
    # MAE has no decode scaling (its recipe runs at batch 4096); an absolute lr replaces the rule.
    assert peak_lr(recipe(tmp_path, "mae_vitb_800ep")) == pytest.approx(1.5e-4 * 4096 / 256)
    assert peak_lr(recipe(tmp_path, "mae_vitb_800ep", "optim.lr=1e-3")) == pytest.approx(1e-3)
    # CrossMAE scales by its own ratios, as its main_pretrain.py (kept_mask_ratio / mask_ratio).
    assert peak_lr(recipe(tmp_path, "crossmae_vitb_800ep")) == pytest.approx(1.5e-4 * 4096 / 256 * 0.25 / 0.75)
    assert peak_lr(recipe(tmp_path, "crossmae_vitb_800ep", "crossmae.decode_ratio=0.5")) == \
        pytest.approx(1.5e-4 * 4096 / 256 * 0.5 / 0.75)
    assert peak_lr(recipe(tmp_path, "crossmae_vitb_800ep", "optim.scale_by_decode=false")) == \
        pytest.approx(1.5e-4 * 4096 / 256)


def test_warmup_then_cosine() -> None:
    kw = dict(peak=1.0, warmup_steps=10, total_steps=110, min_lr=0.1)
    assert lr_at(0, **kw) == pytest.approx(0.1)  # never 0 at step 0
    assert lr_at(9, **kw) == pytest.approx(1.0)
    assert lr_at(10, **kw) == pytest.approx(1.0)
    assert lr_at(60, **kw) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(110, **kw) == pytest.approx(0.1)
    lrs = [lr_at(s, **kw) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    assert lr_at(0, peak=1.0, warmup_steps=0, total_steps=5) == pytest.approx(1.0)


def test_progress_and_stages() -> None:
    assert progress_at(0, 800) == 0.0 and progress_at(400, 800) == 0.5 and progress_at(900, 800) == 1.0
    stages = [psts_stage_name(progress_at(s, 8), 0.375, 0.75) for s in range(8)]
    assert stages == ["near"] * 3 + ["far"] * 3 + ["random"] * 2
