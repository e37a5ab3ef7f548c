"""smae-export: encoder weights from DeepSpeed checkpoints of every ZeRO stage load
strictly into timm and give the same features as our encoder on real images."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file

from selectivemae_ds import checkpoint
from selectivemae_ds.evaluate import load_images
from selectivemae_ds.export import load_fp32_state, main
from selectivemae_ds.models import ModelConfig, build_model, configs_from_dict
from tests.shard_fixtures import source_images


def _ours(tag: Path) -> torch.nn.Module:
    config = checkpoint.read_client_state(tag)["config"]
    model = build_model(*configs_from_dict(config))
    model.load_state_dict(load_fp32_state(tag), strict=True)
    return model.eval()


@pytest.mark.parametrize("ds_json", ["zero1.json", "zero2.json", "zero3.json"])
def test_export_loads_strictly_into_timm_with_equal_features(tmp_path, straight_run, assets_dir, ds_json, capsys):
    run = straight_run(ds_json)
    out = tmp_path / "encoder.safetensors"
    assert main([str(run), "--out", str(out)]) == 0
    assert "vit_tiny_patch16_224" in capsys.readouterr().out
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["timm_model"] == "vit_tiny_patch16_224" and meta["img_size"] == 64
    assert meta["steps"] == 4 and meta["method"] == "selectivemae" and meta["checkpoint"].endswith("step_00000004")

    timm_model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=64)
    timm_model.load_state_dict(load_file(out), strict=True)
    timm_model.eval()
    ours = _ours(run / "checkpoints" / "step_00000004")
    imgs = load_images(source_images(assets_dir)[:4], 64)
    with torch.no_grad():
        expected = ours.encoder.forward_features(imgs)
        got = timm_model.forward_features(imgs)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # The exported weights are the trained ones, not a fresh initialisation.
    fresh = build_model(ModelConfig(size="tiny", img_size=64)).encoder.state_dict()
    assert not torch.equal(load_file(out)["blocks.0.attn.qkv.weight"], fresh["blocks.0.attn.qkv.weight"])


def test_universal_checkpoint_exports_the_same_encoder(tmp_path, straight_run):
    run = straight_run("zero2.json")
    tag = run / "checkpoints" / "step_00000002"
    universal = tag.with_name(tag.name + checkpoint.UNIVERSAL_SUFFIX)
    if not checkpoint.is_complete(universal):
        subprocess.run([sys.executable, "-m", "selectivemae_ds.checkpoint", "to-universal", str(tag)],
                       check=True, env=dict(os.environ, DS_ACCELERATOR="cpu"), capture_output=True, timeout=300)
    assert main([str(tag), "--out", str(tmp_path / "a.safetensors")]) == 0
    assert main([str(universal), "--out", str(tmp_path / "b.safetensors")]) == 0
    a, b = load_file(tmp_path / "a.safetensors"), load_file(tmp_path / "b.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_incomplete_or_missing_checkpoints_are_refused(tmp_path, straight_run, capsys):
    tag = straight_run("zero2.json") / "checkpoints" / "step_00000004"
    broken = shutil.copytree(tag, tmp_path / "checkpoints" / tag.name)
    (broken / checkpoint.COMPLETE).unlink()
    assert main([str(broken), "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "is incomplete (no COMPLETE marker)" in capsys.readouterr().err
    assert main([str(tmp_path), "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "no complete checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists()
