"""smae-export: encoder weights from DeepSpeed checkpoints of every ZeRO stage load
strictly into timm and give the same features as our encoder on real images."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load, load_file

from selectivemae_ds import checkpoint, export
from selectivemae_ds.config import config_to_dict, load_config, load_resolved
from selectivemae_ds.errors import EXIT_CHECKPOINT, EXIT_CONFIG
from selectivemae_ds.evaluate import load_images
from selectivemae_ds.export import load_fp32_state, main
from selectivemae_ds.models import ModelConfig, build_model
from tests.shard_fixtures import source_images


def _ours(tag: Path) -> torch.nn.Module:
    config = checkpoint.read_client_state(tag)["config"]
    cfg = load_resolved(config)
    model = build_model(cfg.model, cfg.method_cfg)
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
    assert main([str(broken), "--out", str(tmp_path / "x.safetensors")]) == EXIT_CHECKPOINT
    assert "checkpoint error: " in capsys.readouterr().err
    assert main([str(tmp_path), "--out", str(tmp_path / "x.safetensors")]) == EXIT_CHECKPOINT
    assert "no complete checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists()


# --- output handling, on a hand-made universal checkpoint (no launch: fast) ---

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def universal_tag(tmp_path_factory) -> Path:
    """A complete universal tag of the demo model (fresh weights, step 3) written without DeepSpeed:
    ``zero/<param>/fp32.pt`` per parameter, buffers in the model-states file, the resolved config."""
    root = tmp_path_factory.mktemp("fake_run")
    cfg = load_config(REPO / "configs" / "demo.toml", [f"data.path={root}"])
    config = config_to_dict(cfg)
    model = build_model(cfg.model, cfg.method_cfg)
    tag = root / "checkpoints" / ("step_00000003" + checkpoint.UNIVERSAL_SUFFIX)
    for name, param in model.named_parameters():
        (tag / "zero" / name).mkdir(parents=True)
        torch.save({"param": param.detach().clone()}, tag / "zero" / name / "fp32.pt")
    torch.save({"module": model.state_dict()}, tag / "mp_rank_00_model_states.pt")
    (tag / checkpoint.CLIENT_STATE).write_text(json.dumps({"step": 3, "samples_seen": 24, "world_size": 1, "config": config}))
    (tag / checkpoint.COMPLETE).write_text("")
    return tag


def test_export_writes_weights_and_sidecar_with_umask_permissions(tmp_path, universal_tag, capsys):
    out = tmp_path / "encoder.safetensors"
    old = os.umask(0o022)
    try:
        assert main([str(universal_tag), "--out", str(out)]) == 0
    finally:
        os.umask(old)
    sidecar = tmp_path / "encoder.json"
    assert oct(out.stat().st_mode & 0o777) == oct(0o644)
    assert oct(sidecar.stat().st_mode & 0o777) == oct(0o644)
    meta = json.loads(sidecar.read_text())
    assert meta["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest() and meta["steps"] == 3
    timm_model = timm.create_model(meta["timm_model"], pretrained=False, num_classes=0, img_size=meta["img_size"])
    timm_model.load_state_dict(load_file(out), strict=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["encoder.json", "encoder.safetensors"]  # no temp left


def test_out_ending_in_json_is_refused_and_nothing_written(tmp_path, universal_tag, capsys):
    """Before: the sidecar (out.with_suffix(".json")) was --out itself and overwrote the weights, exit 0."""
    out = tmp_path / "weights.json"
    assert main([str(universal_tag), "--out", str(out)]) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert f"config error: --out {out}: ends in .json" in err and "weights.safetensors" in err
    assert not out.exists()


def test_existing_outputs_are_kept_unless_force(tmp_path, universal_tag, capsys):
    out = tmp_path / "encoder.safetensors"
    assert main([str(universal_tag), "--out", str(out)]) == 0
    before = load(out.read_bytes())  # not load_file: its tensors map the file that is overwritten next
    out.write_bytes(b"user's own file")
    assert main([str(universal_tag), "--out", str(out)]) == EXIT_CONFIG
    assert "already exist(s); pass --force to replace" in capsys.readouterr().err
    assert out.read_bytes() == b"user's own file"
    # The sidecar alone existing is refused too.
    other = tmp_path / "other.safetensors"
    (tmp_path / "other.json").write_text("{}")
    assert main([str(universal_tag), "--out", str(other)]) == EXIT_CONFIG
    assert f"{tmp_path / 'other.json'} already exist(s)" in capsys.readouterr().err
    assert not other.exists()
    assert main([str(universal_tag), "--out", str(out), "--force"]) == 0
    after = load_file(out)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_out_that_is_a_directory_is_refused_before_loading(tmp_path, universal_tag, monkeypatch, capsys):
    def no_loading(*_args, **_kwargs):
        raise AssertionError("the checkpoint was read before --out was checked")

    monkeypatch.setattr(export, "resolve_tag", no_loading)
    monkeypatch.setattr(export, "load_fp32_state", no_loading)
    assert main([str(universal_tag), "--out", str(tmp_path)]) == EXIT_CONFIG
    assert f"config error: --out {tmp_path}: is a directory" in capsys.readouterr().err


def test_missing_source_is_a_config_error(tmp_path, capsys):
    assert main([str(tmp_path / "nope"), "--out", str(tmp_path / "e.safetensors")]) == EXIT_CONFIG
    assert "no such run or checkpoint directory" in capsys.readouterr().err


def test_every_flag_has_help():
    for action in export.build_parser()._actions:
        assert action.help, action.dest


def test_incomplete_tag_and_run_without_checkpoints_are_checkpoint_errors(tmp_path, universal_tag, capsys):
    broken = shutil.copytree(universal_tag, tmp_path / "checkpoints" / universal_tag.name)
    (broken / checkpoint.COMPLETE).unlink()
    assert main([str(broken), "--out", str(tmp_path / "x.safetensors")]) == EXIT_CHECKPOINT
    assert f"checkpoint error: {broken}: checkpoint is incomplete (no COMPLETE marker)" in capsys.readouterr().err
    assert main([str(tmp_path), "--out", str(tmp_path / "x.safetensors")]) == EXIT_CHECKPOINT
    assert f"checkpoint error: {tmp_path}: no complete checkpoint under" in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists()
