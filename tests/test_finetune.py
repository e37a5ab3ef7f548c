"""smae-eval finetune: MAE's recipe on tiny labeled sets (real NEON crops), the init
floor, leak-free group splits, and the errors bad input stops with."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from selectivemae_ds.errors import CheckpointError, ConfigError, DataError
from selectivemae_ds.evaluate import (build_timm, group_split, groups_from_paths, init_encoder, list_image_folder,
                                      main, make_split)
from selectivemae_ds.finetune import Recipe, classifier, finetune_one, make_scheduler, param_groups

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo.toml"


def _crops(assets_dir: Path, n: int, side: int, seed: int) -> list[Image.Image]:
    """n real crops of the bundled OSBS/SOAP scenes."""
    rng = np.random.default_rng(seed)
    scenes = [Image.open(assets_dir / name).convert("RGB") for name in ("OSBS_029.png", "SOAP_061.png")]
    out = []
    for k in range(n):
        im = scenes[k % 2]
        x, y = int(rng.integers(0, im.width - side)), int(rng.integers(0, im.height - side))
        out.append(im.crop((x, y, x + side, y + side)))
    return out


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory, assets_dir) -> Path:
    """Two classes of 12 real crops each, from 4 'scenes' (file prefixes s0..s3): 'dark' crops are
    darkened, so the task is learnable in a few steps; names are SCENE_NNNN.png."""
    root = tmp_path_factory.mktemp("tiny")
    for c, name in enumerate(("bright", "dark")):
        (root / name).mkdir()
        for k, im in enumerate(_crops(assets_dir, 12, 40, seed=c)):
            if name == "dark":
                im = im.point(lambda v: v // 3)
            im.save(root / name / f"s{k % 4}_{k:04d}.png")
    return root


@pytest.fixture(scope="module")
def init_enc():
    return init_encoder(DEMO)


def _data(root: Path, split_by: str | None = r"(s\d)_\d+\.png$", fraction: float = 0.3):
    from argparse import Namespace

    from selectivemae_ds.evaluate import load_labeled

    return load_labeled(Namespace(data=str(root), split_by=split_by, test_fraction=fraction, split_seed=0))


FAST = dict(batch=8, workers=0, img_size=32, drop_path=0.0, warmup_epochs=1.0)


def test_loss_decreases_and_log_has_every_epoch(tiny_set, init_enc, tmp_path):
    data = _data(tiny_set)
    r = finetune_one(init_enc, data, Recipe(epochs=6, blr=0.05, **FAST), seed=0, out_dir=tmp_path, log=False)
    losses = [e["train_loss"] for e in r["epochs"]]
    assert len(losses) == 6 and all(np.isfinite(losses))
    assert losses[-1] < 0.8 * losses[0], losses
    lines = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines] == [1, 2, 3, 4, 5, 6]
    assert {"train_loss", "test_top1", "lr", "seconds"} <= set(lines[0])
    # The saved classifier is timm's, loadable strictly.
    meta = json.loads((tmp_path / "model.json").read_text())
    model = timm.create_model(meta["timm_model"], num_classes=meta["num_classes"], img_size=meta["img_size"],
                              global_pool="avg")
    model.load_state_dict(load_file(tmp_path / "model.safetensors"), strict=True)
    assert meta["classes"] == ["bright", "dark"]


def test_layer_decay_groups_and_lr_scales_follow_the_recipe(init_enc):
    recipe = Recipe(img_size=32)
    model = classifier(init_enc, 5, recipe)
    groups = param_groups(model, recipe)
    names = {id(p): n for n, p in model.named_parameters()}
    where = {names[id(p)]: g for g in groups for p in g["params"]}
    depth = len(model.blocks)
    assert depth == 12 and len(where) == sum(1 for _ in model.parameters())
    expect = {"cls_token": (0.75 ** 13, 0.0), "pos_embed": (0.75 ** 13, 0.0), "patch_embed.proj.weight": (0.75 ** 13, 0.05),
              "blocks.0.attn.qkv.weight": (0.75 ** 12, 0.05), "blocks.0.norm1.weight": (0.75 ** 12, 0.0),
              "blocks.11.mlp.fc2.weight": (0.75, 0.05), "blocks.11.mlp.fc2.bias": (0.75, 0.0),
              "fc_norm.weight": (1.0, 0.0), "head.weight": (1.0, 0.05), "head.bias": (1.0, 0.0)}
    for name, (scale, wd) in expect.items():
        assert where[name]["lr_scale"] == pytest.approx(scale), name
        assert where[name]["weight_decay"] == wd, name
    # Mean pooling + fc_norm: the encoder's final norm is gone, fc_norm is new (ones/zeros).
    assert isinstance(model.norm, torch.nn.Identity)
    assert torch.equal(model.fc_norm.weight, torch.ones(192))
    # lr = blr * batch / 256; after warmup each group runs at lr * lr_scale, then cosine.
    assert recipe.peak_lr(512) == pytest.approx(2e-3)
    opt = torch.optim.AdamW(groups, lr=recipe.peak_lr(256))
    sched = make_scheduler(opt, Recipe(epochs=10, warmup_epochs=2), steps_per_epoch=10)
    sched.step_update(0)
    assert all(g["lr"] == 0.0 for g in opt.param_groups)
    sched.step_update(20)
    for g in opt.param_groups:
        assert g["lr"] == pytest.approx(1e-3 * g["lr_scale"])
    sched.step_update(100)
    for g in opt.param_groups:
        assert g["lr"] == pytest.approx(1e-6 * g["lr_scale"], rel=1e-3)


def test_freeze_blocks_keeps_frozen_weights_bit_identical(tiny_set, init_enc, tmp_path):
    data = _data(tiny_set)
    finetune_one(init_enc, data, Recipe(epochs=2, blr=0.05, freeze_blocks=2, **FAST), seed=1, out_dir=tmp_path,
                 log=False)
    tuned = load_file(tmp_path / "model.safetensors")
    start = build_timm(init_enc, num_classes=2, global_pool="avg", img_size=32).state_dict()
    frozen = [k for k in tuned if k.startswith(("patch_embed.", "blocks.0.", "blocks.1.")) or k in ("cls_token", "pos_embed")]
    assert len(frozen) == 2 + 2 * 12 + 2
    for k in frozen:
        assert torch.equal(tuned[k], start[k]), k
    assert not torch.equal(tuned["blocks.2.attn.qkv.weight"], start["blocks.2.attn.qkv.weight"])
    assert not torch.equal(tuned["blocks.11.mlp.fc1.weight"], start["blocks.11.mlp.fc1.weight"])


def test_group_split_keeps_groups_whole(tiny_set):
    paths, labels, classes = list_image_folder(tiny_set)
    groups = groups_from_paths(paths, tiny_set, r"(s\d)_\d+\.png$")
    assert sorted(set(groups)) == ["s0", "s1", "s2", "s3"]
    for seed in range(5):
        split = make_split(paths, labels, classes, tiny_set, split_by=r"(s\d)_\d+\.png$", test_fraction=0.3, seed=seed)
        test_groups = {groups[i] for i in split.test}
        train_groups = {groups[i] for i in split.train}
        assert test_groups.isdisjoint(train_groups)
        assert sorted(test_groups) == list(split.test_groups) and sorted(train_groups) == list(split.train_groups)
        assert sorted(np.concatenate([split.train, split.test]).tolist()) == list(range(len(paths)))
        assert 0 < split.test.size <= 0.3 * len(paths)
    # One class per group: whichever group is held out takes its class away from training.
    labels2 = np.array([0, 0, 1, 1])
    with pytest.raises(DataError, match="class '[ab]' has no training image after --split-by"):
        group_split(["x", "x", "y", "y"], labels2, ["a", "b"], 0.5, seed=0)
    with pytest.raises(DataError, match="needs at least 2"):
        group_split(["x"] * 4, labels2, ["a", "b"], 0.5, seed=0)
    with pytest.raises(DataError, match=r"s0_0000\.png: --split-by 'zzz' does not match"):
        groups_from_paths(paths, tiny_set, "zzz")
    with pytest.raises(ConfigError, match="not a valid regular expression"):
        groups_from_paths(paths, tiny_set, "(")


def test_cli_finetune_reports_seeds_mean_std_and_floors(tiny_set, tmp_path, capsys):
    out = tmp_path / "ft"
    rc = main(["finetune", "--weights", "init", "--config", str(DEMO), "--data", str(tiny_set), "--out", str(out),
               "--split-by", r"(s\d)_\d+\.png$", "--seeds", "0,1", "--epochs", "1", "--warmup-epochs", "0",
               "--img-size", "32", "--batch", "8", "--workers", "0", "--floor-size", "8"])
    assert rc == 0, capsys.readouterr().err
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report == json.loads((out / "report.json").read_text())
    assert report["seeds"] == [0, 1] and len(report["top1"]) == 2
    assert report["top1_summary"]["mean"] == pytest.approx(np.mean(report["top1"]), abs=1e-4)
    assert report["top1_summary"]["std"] == pytest.approx(np.std(report["top1"], ddof=1), abs=1e-4)
    assert set(report["test_groups"]).isdisjoint(report["train_groups"])
    assert set(report["floors"]) == {"majority", "raw_pixels_knn", "raw_pixels_linear", "mean_color_knn",
                                     "mean_color_linear"}
    assert report["n_train"] + report["n_test"] == 24
    assert (out / "seed_1" / "model.safetensors").is_file() and (out / "seed_0" / "log.jsonl").is_file()


def test_init_is_seeded_and_loads_into_timm(init_enc):
    again = init_encoder(DEMO)
    assert init_enc.state.keys() == again.state.keys()
    assert all(torch.equal(init_enc.state[k], again.state[k]) for k in init_enc.state)
    other = init_encoder(DEMO, ["train.seed=1"])
    assert not torch.equal(other.state["blocks.0.attn.qkv.weight"], init_enc.state["blocks.0.attn.qkv.weight"])
    model = timm.create_model(init_enc.timm_model, num_classes=0, img_size=init_enc.img_size)
    model.load_state_dict(init_enc.state, strict=True)


@pytest.mark.slow
def test_init_equals_a_step0_export_bit_for_bit(tmp_path, launch_dataset):
    """A trainer built from the config, saved at step 0 (before any step) and exported:
    the same weights as --weights init of that run's config (bf16, as the run's DeepSpeed
    JSON; the fp32 initialization differs by exactly that rounding)."""
    run = tmp_path / "run"
    script = f"""
import sys
from selectivemae_ds import checkpoint
from selectivemae_ds.config import load_config
from selectivemae_ds.engine import load_ds_json
from selectivemae_ds.trainer import Trainer
cfg = load_config({str(DEMO)!r}, ["data.path={launch_dataset}", "run_dir={run}", "train.steps=4"])
src = {str(REPO / 'ds_configs' / 'cpu_smoke.json')!r}
t = Trainer(cfg, load_ds_json(src), src)
checkpoint.save(t.engine, t.cfg.checkpoint_dir, 0, t.client_state(), 2)
t.close()
"""
    r = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=dict(os.environ, DS_ACCELERATOR="cpu"),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    from selectivemae_ds.export import export

    export(run / "checkpoints" / "step_00000000", tmp_path / "step0.safetensors")
    exported = load_file(tmp_path / "step0.safetensors")
    init = init_encoder(run)
    assert exported.keys() == init.state.keys()
    for k in exported:
        assert torch.equal(exported[k], init.state[k]), k
    fp32 = init_encoder(run, precision="fp32").state
    assert not torch.equal(fp32["blocks.0.attn.qkv.weight"], exported["blocks.0.attn.qkv.weight"])
    assert torch.equal(fp32["blocks.0.attn.qkv.weight"].bfloat16().float(), exported["blocks.0.attn.qkv.weight"])


@pytest.mark.slow
def test_torchrun_two_cpu_ranks_train_one_model(tiny_set, tmp_path):
    """Unchanged under torchrun: 2 gloo ranks (DistributedSampler, DDP), rank 0 reports and saves."""
    out = tmp_path / "ft"
    from tests.launch import free_port

    cmd = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "selectivemae_ds.evaluate", "finetune", "--weights", "init", "--config", str(DEMO),
           "--data", str(tiny_set), "--out", str(out), "--split-by", r"(s\d)_\d+\.png$", "--epochs", "2",
           "--warmup-epochs", "0", "--img-size", "32", "--batch", "4", "--workers", "0", "--floor-size", "8"]
    r = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1"),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    reports = [json.loads(line) for line in r.stdout.splitlines() if line.startswith('{"mode"')]
    assert len(reports) == 1 and reports[0]["world_size"] == 2
    report = reports[0]
    # Each rank steps through half the training set: ceil(n_train / 2) / batch 4 steps per epoch.
    log = [json.loads(x) for x in (out / "seed_0" / "log.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in log] == [1, 2]
    n_correct = round(log[-1]["test_top1"] * report["n_test"], 6)
    assert n_correct == int(n_correct)  # a share of the whole test split, not of one rank's part
    meta = json.loads((out / "seed_0" / "model.json").read_text())
    model = timm.create_model(meta["timm_model"], num_classes=2, img_size=32, global_pool="avg")
    model.load_state_dict(load_file(out / "seed_0" / "model.safetensors"), strict=True)


def test_bad_input_stops_with_a_message_naming_it(tiny_set, tmp_path, capsys, init_enc):
    common = ["--weights", "init", "--config", str(DEMO), "--out", str(tmp_path / "o"), "--epochs", "1", "--warmup-epochs", "0",
              "--img-size", "32", "--workers", "0"]
    one = tmp_path / "one"
    (one / "only").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(one / "only" / "a.png")
    assert main(["finetune", "--data", str(one), *common]) == 3
    assert ">= 2 class folders" in capsys.readouterr().err

    empty = tmp_path / "empty"
    for c in ("a", "b"):
        (empty / c).mkdir(parents=True)
    for k in range(3):
        Image.new("RGB", (8, 8), (k, 0, 0)).save(empty / "a" / f"{k}.png")
    for mode in ("finetune", "knn"):
        args = common if mode == "finetune" else common[:4]
        assert main([mode, "--data", str(empty), *args]) == 3
        assert "class folder 'b' holds no images" in capsys.readouterr().err

    bad = tmp_path / "bad"
    for c in ("a", "b"):
        (bad / c).mkdir(parents=True)
        for k in range(3):
            Image.new("RGB", (8, 8), (k, 0, 0)).save(bad / c / f"{k}.png")
    (bad / "b" / "notes.png").write_text("not an image")
    assert main(["finetune", "--data", str(bad), *common]) == 3
    assert f"{bad / 'b' / 'notes.png'}: not a readable image" in capsys.readouterr().err

    # Weights of another architecture (ViT-small) claiming to be the demo's ViT-tiny.
    small = timm.create_model("vit_small_patch16_224", num_classes=0, img_size=64).state_dict()
    w = tmp_path / "small.safetensors"
    save_file({k: v.contiguous() for k, v in small.items()}, w)
    w.with_suffix(".json").write_text(json.dumps({"timm_model": "vit_tiny_patch16_224", "img_size": 64}))
    assert main(["finetune", "--data", str(tiny_set), "--weights", str(w), *common[4:]]) == 4
    err = capsys.readouterr().err
    assert f"--weights {w}: not an encoder of timm's vit_tiny_patch16_224" in err and "wrong shapes" in err
    with pytest.raises(CheckpointError, match="no such file"):
        main_raises(["knn", "--data", str(tiny_set), "--weights", str(tmp_path / "none.safetensors")])

    assert main(["finetune", "--data", str(tiny_set), "--weights", "init", "--out", str(tmp_path / "o")]) == 2
    assert "--weights init needs --config" in capsys.readouterr().err
    assert main(["finetune", "--data", str(tiny_set), *common, "--seeds", "0,x"]) == 2
    assert "--seeds '0,x'" in capsys.readouterr().err
    assert main(["finetune", "--data", str(tiny_set), *common, "--freeze-blocks", "13"]) == 2
    assert "only 12 blocks" in capsys.readouterr().err


def main_raises(argv: list[str]) -> None:
    from selectivemae_ds.evaluate import _main

    _main(argv)


def test_mixup_cutmix_path_trains_with_soft_targets(tiny_set, init_enc):
    data = _data(tiny_set)
    r = finetune_one(init_enc, data, Recipe(epochs=1, mixup=0.8, cutmix=1.0, **FAST), seed=0, out_dir=None,
                     log=False)
    # Mixup needs even batches: the last partial batch is dropped (17 training images, batch 8).
    assert r["steps_per_epoch"] == data.split.train.size // 8
    assert np.isfinite(r["epochs"][0]["train_loss"])
