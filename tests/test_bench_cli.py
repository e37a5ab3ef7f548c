"""`smae-bench` modes on the CPU at toy sizes: each runs and prints one JSON record with the keys
that bench/gpu_suite.py and bench/results/*.json rely on.

Each mode runs in a subprocess, as a user runs it: e2e initializes a process group and
DeepSpeed, which must not leak into the test process.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from selectivemae_ds.benchmark import cli, e2e, loader, model
from selectivemae_ds.errors import EXIT_CONFIG, ConfigError
from tests.shard_fixtures import build_dataset

REPO = Path(__file__).resolve().parents[1]
# A decoder as small as the demo's keeps a bf16 CPU step well under a second.
SMALL_DECODER = ["--set", "model.decoder_depth=2", "--set", "model.decoder_dim=128", "--set", "model.decoder_heads=4"]


def bench(*argv: str, timeout: float = 600) -> dict[str, Any]:
    """Run `smae-bench ARGV` and return the JSON record on the last line of stdout."""
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1")
    r = subprocess.run([sys.executable, "-m", "selectivemae_ds.benchmark.cli", *argv], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory, assets_dir: Path) -> Path:
    return build_dataset(tmp_path_factory.mktemp("bench_cli") / "data", assets_dir, count=24, shards=2)


def test_model_mode_prints_a_record() -> None:
    rec = bench("model", "--size", "tiny", "--img-size", "64", "--batch", "2", "--steps", "1", "--warmup", "1",
                "--device", "cpu", "--method", "mae")
    assert rec["mode"] == "model" and rec["method"] == "mae" and rec["size"] == "tiny"
    assert rec["batch"] == 2 and rec["steps"] == 1 and rec["img_per_s"] > 0
    assert rec["device_name"] == "cpu" and rec["mfu"] is None and rec["peak_mem_gb"] is None
    assert 0 <= rec["select_share"] < 1 and rec["flops_per_img"] > 0
    assert rec["versions"]["torch"] and rec["versions"]["python"]


def test_loader_mode_prints_a_record(dataset: Path) -> None:
    rec = bench("loader", "--data", str(dataset), "--batch", "4", "--steps", "2", "--warmup", "1", "--workers", "1",
                "--decode-threads", "1", "--img-size", "64", "--no-baseline")
    assert rec["mode"] == "loader" and rec["batch"] == 4 and rec["steps"] == 2
    assert rec["img_per_s"] > 0 and rec["baseline_img_per_s"] is None
    assert rec["decode_device"] == "cpu" and rec["records"] == 24 and rec["substituted"] == 0


def test_e2e_mode_runs_the_trainer_on_cpu(dataset: Path) -> None:
    rec = bench("e2e", "--data", str(dataset), "--size", "tiny", "--img-size", "64", "--batch", "8",
                "--micro-batch", "4", "--steps", "2", "--warmup", "1", "--deepspeed-config",
                "cpu_smoke", "--device", "cpu", "--workers", "1", "--decode-threads", "1",
                "--prefetch", "1", *SMALL_DECODER)
    assert rec["mode"] == "e2e" and rec["method"] == "selectivemae" and rec["size"] == "tiny"
    assert rec["batch"] == 8 and rec["micro_batch"] == 4 and rec["accum"] == 2
    assert rec["steps"] == 2 and rec["warmup"] == 1 and rec["steps_applied"] == 2 and rec["loss_finite"]
    assert rec["img_per_s"] > 0 and 0 <= rec["data_wait_fraction"] < 1
    assert rec["peak_mem_gb"] is None and rec["device_used_gb"] is None and rec["mfu"] is None
    assert rec["device"] == "cpu" and rec["decode_device"] == "cpu" and rec["zero_stage"] == 2
    assert rec["deepspeed_config"] == str(REPO / "ds_configs" / "cpu_smoke.json")  # the bundled one, by name
    # --progress 0.5 (default) puts the steps in PSTS's far stage (id 1).
    assert rec["psts_stage_id"] == 1.0 and abs(rec["progress"] - 0.5) < 0.01
    assert rec["versions"]["deepspeed"] and rec["versions"]["dali"]


def test_e2e_mode_reports_a_config_error(dataset: Path) -> None:
    env = dict(os.environ, DS_ACCELERATOR="cpu")
    r = subprocess.run([sys.executable, "-m", "selectivemae_ds.benchmark.cli", "e2e", "--data", str(dataset),
                        "--size", "tiny", "--img-size", "64", "--batch", "6", "--micro-batch", "4", "--device", "cpu",
                        "--deepspeed-config", "ds_configs/cpu_smoke.json"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 2 and "config error: train.global_batch" in r.stderr, r.stderr[-2000:]


def test_unknown_mode_is_a_config_error(capsys) -> None:
    assert cli.main(["nope"]) == EXIT_CONFIG
    assert "config error: smae-bench: unknown mode 'nope' (choose from model, loader, e2e)" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--batch", "0"], "--batch and --steps must be >= 1"),
    (["--progress", "2"], "--progress must be in [0, 1], got 2.0"),
    (["--size", "tiny", "--img-size", "50"], "model.img_size: must be a positive multiple of the patch size 16"),
])
def test_model_mode_refuses_bad_flags_before_building(argv: list[str], message: str, capsys) -> None:
    assert cli.main(["model", "--device", "cpu", *argv]) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert err.startswith("config error: ") and message in err, err


def test_e2e_default_deepspeed_config_does_not_depend_on_the_working_directory(tmp_path, monkeypatch) -> None:
    """Before: the default was the relative path ds_configs/zero2.json, missing outside a checkout's root."""
    monkeypatch.chdir(tmp_path)
    default = e2e.build_parser().parse_args(["--data", "x"]).deepspeed_config
    resolved = e2e.resolve_ds_config(default)
    assert resolved.is_file() and resolved.name == "zero2.json"
    assert json.loads(resolved.read_text()) == json.loads((REPO / "ds_configs" / "zero2.json").read_text())
    assert e2e.resolve_ds_config("zero3.json").name == "zero3.json"
    (tmp_path / "mine.json").write_text("{}")
    assert e2e.resolve_ds_config("mine.json") == Path("mine.json")  # an existing file wins
    with pytest.raises(ConfigError, match=r"--deepspeed-config zero9: no such file, nor a bundled config "
                                          r"\(cpu_smoke, zero1, zero2, zero3\)"):
        e2e.resolve_ds_config("zero9")
    with pytest.raises(ConfigError, match="--deepspeed-config sub/zero2.json: no such file$"):
        e2e.resolve_ds_config("sub/zero2.json")


@pytest.mark.parametrize("module", [e2e, loader, model])
def test_every_flag_has_help(module) -> None:
    for action in module.build_parser()._actions:
        assert action.help, (module.__name__, action.dest)
