"""Experiment config: TOML + --set overrides, coercion, validation messages, resolved config."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from selectivemae_ds import checkpoint
from selectivemae_ds.config import (config_to_dict, fixed_on_resume, load_config, load_resolved, resolve_steps,
                                    to_toml, write_resolved)
from selectivemae_ds.data import order
from selectivemae_ds.errors import ConfigError, RunError

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo.toml"


@pytest.fixture()
def data_dir(tmp_path: Path) -> Path:
    """An existing directory for data.path (validation checks existence only)."""
    d = tmp_path / "data"
    d.mkdir()
    return d


def demo(data_dir: Path, *extra: str):
    return load_config(DEMO, [f"data.path={data_dir}", *extra])


def test_demo_config_and_overrides_are_typed(data_dir: Path) -> None:
    cfg = demo(data_dir, "train.steps=12", "optim.blr=3e-4", "model.norm_pix_loss=false", "data.scale=0.3,0.9",
               "debug.nonfinite_at=[2,5]")
    assert cfg.train.steps == 12 and isinstance(cfg.train.steps, int)
    assert cfg.optim.blr == pytest.approx(3e-4)
    assert cfg.model.norm_pix_loss is False
    assert cfg.data.scale == (0.3, 0.9)
    assert cfg.debug.nonfinite_at == [2, 5]
    # data.img_size follows the model unless the user sets it.
    assert cfg.data.img_size == cfg.model.img_size == 64


@pytest.mark.parametrize("override, message", [
    ("train.global_batch=-1", "train.global_batch: must be >= 1"),
    ("train.global_batch=9", "train.global_batch: 9 is not a multiple of train.micro_batch (2)"),
    ("train.steps=abc", "train.steps: expected an integer, got 'abc'"),
    ("train.micro_batch=0", "train.micro_batch: must be >= 1"),
    ("train.epochs=3", "train.steps: set train.steps (8) or train.epochs (3.0), not both"),
    ("optim.blr=0", "optim.blr: must be > 0"),
    ("optim.beta2=1.5", "optim.beta2: must be in [0, 1)"),
    ("checkpoint.keep=0", "checkpoint.keep: must be >= 1"),
    ("checkpoint.every_steps=-3", "checkpoint.every_steps: must be >= 0"),
    ("checkpoint.resume=/nonexistent/tag", "checkpoint.resume: /nonexistent/tag is neither"),
    ("model.size=gigantic", "model.size: unknown size 'gigantic'"),
    ("model.method=beit", "model.method: unknown method 'beit'"),
    ("model.img_size=70", "model.img_size: must be a positive multiple of the patch size 16"),
    ("selectivemae.mask_ratio=1.2", "selectivemae.mask_ratio: must be in (0, 1)"),
    ("masking.mask_ratio=0.9", "masking: the [masking] section was split into one section per method"),
    ("data.img_size=96", "data.img_size: 96 differs from model.img_size (64)"),
    ("data.hflip=2", "data.hflip: a probability in [0, 1]"),
    ("train.colour=blue", "train.colour: unknown key"),
    ("optimizer.lr=1", "optimizer.lr: unknown key"),
    ("model.decoder_self_attn=maybe", "model.decoder_self_attn: expected true or false"),
])
def test_bad_values_name_their_key(data_dir: Path, override: str, message: str) -> None:
    with pytest.raises(ValueError) as e:
        demo(data_dir, override)
    assert message in str(e.value)


def test_missing_data_path_and_run_dir(data_dir: Path) -> None:
    with pytest.raises(ValueError, match="data.path: /no/such/dir does not exist"):
        load_config(DEMO, ["data.path=/no/such/dir"])
    with pytest.raises(ValueError, match="run_dir: no output directory given"):
        demo(data_dir, "run_dir=")


def test_unknown_toml_key_is_rejected(tmp_path: Path, data_dir: Path) -> None:
    f = tmp_path / "x.toml"
    f.write_text(f'run_dir = "r"\n[data]\npath = "{data_dir}"\n[train]\nsteps = 2\nglobal_batch = 8\n'
                 "micro_batch = 2\nwarmup = 3\n")
    with pytest.raises(ValueError, match="train.warmup: unknown key"):
        load_config(f)


def test_epochs_are_converted_once(data_dir: Path) -> None:
    cfg = demo(data_dir, "train.steps=0", "train.epochs=2.5", "optim.warmup_steps=-1", "optim.warmup_epochs=0.5")
    out = resolve_steps(cfg, dataset_len=10 * cfg.train.global_batch + 3)
    assert (out.train.steps, out.train.epochs, out.optim.warmup_steps) == (25, 0.0, 5)
    assert cfg.train.steps == 0  # the input is not mutated


def test_resolved_config_round_trips(tmp_path: Path, data_dir: Path) -> None:
    cfg = demo(data_dir, f"run_dir={tmp_path / 'run'}", "debug.nonfinite_at=[3]")
    path = write_resolved(cfg, cfg.run_dir)
    assert path.read_text() == to_toml(cfg)
    assert load_config(path) == cfg


def test_paper_recipes_parse(data_dir: Path) -> None:
    for name in ("selectivemae_vitb_800ep", "selectivemae_vitl_800ep", "mae_vitb_800ep"):
        cfg = load_config(REPO / "configs" / f"{name}.toml", [f"data.path={data_dir}"])
        # MAE's recipe runs at its paper's batch 4096 (tests/test_model_config.py checks every recipe).
        assert cfg.train.epochs == 800 and cfg.train.global_batch == (4096 if name.startswith("mae") else 1024)
        assert cfg.optim.blr == pytest.approx(1.5e-4)
    vitl = load_config(REPO / "configs" / "selectivemae_vitl_800ep.toml", [f"data.path={data_dir}"])
    assert (vitl.model.size, vitl.method_cfg.mask_ratio, vitl.method_cfg.decode_ratio) == ("large", 0.85, 0.25)


def test_cli_reports_config_error_before_any_work(tmp_path: Path, data_dir: Path) -> None:
    run_dir = tmp_path / "run"
    env = dict(os.environ, DS_ACCELERATOR="cpu")
    r = subprocess.run([str(Path(sys.executable).parent / "smae-pretrain"), "--config", str(DEMO),
                        "--set", f"data.path={data_dir}", "--set", f"run_dir={run_dir}",
                        "--set", "train.global_batch=7"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2
    assert "config error: train.global_batch: 7 is not a multiple of train.micro_batch (2)" in r.stderr
    assert not run_dir.exists()


@pytest.mark.parametrize("override, message", [
    ("train.seed=-1", "train.seed: must be an integer in [0, 2**63 - 1], got -1"),
    (f"train.seed={2**63}", f"train.seed: must be an integer in [0, 2**63 - 1], got {2**63}"),
    ("train.collective_timeout_s=0", "train.collective_timeout_s: must be > 0"),
    ("debug.checkpoint_delay_s=-1", "debug.checkpoint_delay_s: must be >= 0"),
])
def test_seed_timeout_and_debug_values_are_checked(data_dir: Path, override: str, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        demo(data_dir, override)
    assert message in str(e.value)


@pytest.mark.parametrize("old, new", [("train.nonfinite_at=[1]", "debug.nonfinite_at"),
                                      ("train.nonfinite_grad_at=[1]", "debug.nonfinite_grad_at"),
                                      ("train.nonfinite_value=inf", "debug.nonfinite_value")])
def test_fault_injection_keys_moved_to_debug(tmp_path: Path, data_dir: Path, old: str, new: str) -> None:
    key = old.split("=")[0]
    with pytest.raises(ConfigError, match=rf"{key}: moved to {new} \(test-only fault injection lives in the \[debug\]"):
        demo(data_dir, old)
    f = tmp_path / "old.toml"
    f.write_text(f'run_dir = "r"\n[data]\npath = "{data_dir}"\n[train]\nsteps = 2\nglobal_batch = 8\nmicro_batch = 2\n'
                 f"{key.split('.')[1]} = [1]\n")
    with pytest.raises(ConfigError, match=rf"{key}: moved to {new}"):
        load_config(f)


def test_missing_config_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=f"{tmp_path / 'nope.toml'}: no such config file"):
        load_config(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="is a directory, not a TOML config file"):
        load_config(tmp_path)


def test_write_resolved_is_durable(tmp_path: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The resolved config goes through selectivemae_ds.atomic: file and directory fsynced, no temp left."""
    import selectivemae_ds.atomic as atomic

    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(atomic.os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    cfg = demo(data_dir, f"run_dir={tmp_path / 'run'}")
    path = write_resolved(cfg, cfg.run_dir)
    assert len(synced) == 2  # the file, then its directory
    assert sorted(p.name for p in path.parent.iterdir()) == ["config.toml"]
    assert path.stat().st_mode & 0o777 == 0o666 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_load_resolved_is_the_one_reader(tmp_path: Path, data_dir: Path) -> None:
    """export/visualize rebuild configs through build_config: unknown keys are named, paths need not exist."""
    cfg = demo(data_dir, f"run_dir={tmp_path / 'run'}", "model.decoder_depth=3")
    saved = config_to_dict(cfg)
    saved["data"]["path"] = "/elsewhere/data"  # the training machine's path
    back = load_resolved(saved)
    assert back.model == cfg.model and back.method_cfg == cfg.method_cfg and back.data.path == "/elsewhere/data"
    assert load_resolved(write_resolved(cfg, cfg.run_dir)) == cfg
    with pytest.raises(ConfigError, match=r"model.colour: unknown key \(known: "):
        load_resolved({**saved, "model": {**saved["model"], "colour": "red"}})
    with pytest.raises(ConfigError, match="not a resolved training config"):
        load_resolved({"train": {}})
    with pytest.raises(ConfigError, match="no resolved training config"):
        load_resolved(None)  # type: ignore[arg-type]


def test_resume_compatibility_is_derived_from_the_config() -> None:
    keys = fixed_on_resume()
    assert {"data.scale", "data.ratio", "data.hflip", "data.img_size", "model.size", "train.global_batch",
            "train.seed"} <= set(keys)
    assert not {"optim.blr", "train.steps", "data.path", "data.workers", "train.log_every"} & set(keys)
    assert checkpoint.COMPAT_KEYS == keys


def test_resume_with_another_crop_scale_is_refused(data_dir: Path) -> None:
    saved = config_to_dict(demo(data_dir))
    current = config_to_dict(demo(data_dir, "data.scale=0.3,1.0"))
    with pytest.raises(ConfigError, match=r"data.scale: the checkpoint TAG was trained with \[0.2, 1.0\], "
                                          r"this config has \[0.3, 1.0\]"):
        checkpoint.check_compatible(saved, current, "TAG")
    checkpoint.check_compatible(saved, config_to_dict(demo(data_dir, "optim.blr=0.1", "train.steps=20")), "TAG")


def test_dataset_smaller_than_a_global_batch_is_one_check(data_dir: Path) -> None:
    message = ("train.global_batch: the dataset (data.path) of 5 records is smaller than one global batch of 8; "
               "lower train.global_batch or pack more images")
    with pytest.raises(ConfigError) as e:
        resolve_steps(demo(data_dir), dataset_len=5)
    assert str(e.value) == message
    with pytest.raises(ConfigError) as e:
        order.steps_per_epoch(5, 8)
    assert str(e.value) == message


def test_main_lets_unexpected_errors_propagate(monkeypatch: pytest.MonkeyPatch, data_dir: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """Only the project's error types become messages and exit codes; a bug keeps its traceback."""
    from selectivemae_ds import trainer

    argv = ["--config", str(DEMO), "--deepspeed_config", str(REPO / "ds_configs" / "cpu_smoke.json"),
            "--set", f"data.path={data_dir}", "--set", f"run_dir={tmp_path / 'run'}"]

    def fail_with(exc: Exception):
        def start(*args, **kwargs):
            raise exc
        monkeypatch.setattr(trainer, "Trainer", start)

    fail_with(ValueError("a bug deep inside DeepSpeed"))
    with pytest.raises(ValueError, match="a bug deep inside DeepSpeed"):
        trainer.main(argv)
    fail_with(RunError("run_dir is in use"))
    assert trainer.main(argv) == 5
    assert capsys.readouterr().err == "run error: run_dir is in use\n"


def test_cli_names_a_missing_config_file(tmp_path: Path) -> None:
    env = dict(os.environ, DS_ACCELERATOR="cpu")
    r = subprocess.run([str(Path(sys.executable).parent / "smae-pretrain"), "--config", str(tmp_path / "nope.toml")],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().endswith(f"config error: {tmp_path / 'nope.toml'}: no such config file")


def test_export_rebuilds_the_config_through_load_resolved(tmp_path: Path, data_dir: Path) -> None:
    from selectivemae_ds import export

    saved = config_to_dict(demo(data_dir, f"run_dir={tmp_path / 'run'}"))
    model, masking = export._configs({"config": saved})
    assert (model.size, model.img_size, masking.mask_ratio) == ("tiny", 64, 0.85)
    with pytest.raises(ConfigError, match=r"model.depth: unknown key"):
        export._configs({"config": {**saved, "model": {**saved["model"], "depth": 3}}})
