"""Inputs: every wrong config value stops ``smae-pretrain``/``launcher/pretrain.py`` with exit
code 2 and a message naming the key, before any work (no process group, no run_dir).

``tests/test_config.py`` checks the messages of ``load_config`` one by one; this sweep goes
through the trainer's entry point (``trainer.main``, the same code path as the CLI) so it
also covers the DeepSpeed JSON merge and the world-size check, and asserts that nothing
was created.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from selectivemae_ds import trainer
from tests.launch import DEMO, REPO

CASES: list[tuple[str, list[str], str]] = [
    ("mask ratio > 1", ["selectivemae.mask_ratio=1.5"], "selectivemae.mask_ratio: must be in (0, 1)"),
    ("mask ratio 0", ["selectivemae.mask_ratio=0"], "selectivemae.mask_ratio: must be in (0, 1)"),
    ("decode ratio > 1", ["selectivemae.decode_ratio=1.2"], "selectivemae.decode_ratio: must be in (0, 1]"),
    ("mae ratio", ["mae.mask_ratio=-0.1"], "mae.mask_ratio: must be in (0, 1)"),
    ("old [masking] key", ["masking.mae_mask_ratio=0.5"], "masking: the [masking] section was split into one section "
     "per method ([selectivemae], [mae], [crossmae]); rename masking.mae_mask_ratio -> mae.mask_ratio or crossmae.mask_ratio"),
    ("crop scale", ["data.scale=0.5,1.5"], "data.scale: need 0 < min <= max <= 1"),
    ("crop ratio", ["data.ratio=2.0,1.0"], "data.ratio: need 0 < min <= max"),
    ("flip probability", ["data.hflip=1.5"], "data.hflip: a probability in [0, 1]"),
    ("batch not divisible", ["train.global_batch=10", "train.micro_batch=4"],
     "train.global_batch: 10 is not a multiple of train.micro_batch (4)"),
    ("batch not divisible by ranks", ["train.global_batch=12", "train.micro_batch=4", "WORLD_SIZE=2"],
     "train.global_batch: 12 is not a multiple of train.micro_batch (4) x 2 ranks"),
    ("missing data path", ["data.path=/nonexistent/smae-data"], "data.path: /nonexistent/smae-data does not exist"),
    ("unknown method", ["model.method=beit"], "model.method: unknown method 'beit'"),
    ("unknown size", ["model.size=giant"], "model.size: unknown size 'giant'"),
    ("unknown key", ["train.stepz=3"], "train.stepz: unknown key"),
    ("wrong type", ["optim.blr=fast"], "optim.blr: expected a number, got 'fast'"),
    ("negative fault step", ["debug.nonfinite_grad_at=[-1]"], "debug.nonfinite_grad_at: fault-injection steps"),
    ("fault value", ["debug.nonfinite_value=zero"], 'debug.nonfinite_value: must be "nan" or "inf"'),
    ("resume target", ["checkpoint.resume=/nonexistent/step_00000002"], "checkpoint.resume: /nonexistent/step_00000002"),
]

JSON_CASES: list[tuple[str, dict, str]] = [
    ("batch contradicts TOML", {"train_batch_size": 16, "zero_optimization": {"stage": 2}},
     '"train_batch_size": 16 contradicts train.global_batch = 8'),
    ("micro batch contradicts TOML", {"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 2}},
     "train_micro_batch_size_per_gpu"),
    ("optimizer block", {"optimizer": {"type": "Adam"}, "zero_optimization": {"stage": 2}}, '"optimizer"'),
    ("zero stage 0", {"zero_optimization": {"stage": 0}}, "stage"),
    ("fp16", {"fp16": {"enabled": True}, "zero_optimization": {"stage": 2}}, '"fp16" is not supported'),
    ("overflow check off", {"bf16": {"enabled": True, "check_grad_overflow": False}, "zero_optimization": {"stage": 2}},
     '"bf16.check_grad_overflow" must stay true'),
]


def _main(tmp_path: Path, data: Path, overrides: list[str], ds_json: Path,
          monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, Path]:
    run_dir = tmp_path / "run"
    monkeypatch.setenv("WORLD_SIZE", "1")
    sets: list[str] = []
    for o in overrides:
        if o.startswith("WORLD_SIZE="):
            monkeypatch.setenv("WORLD_SIZE", o.split("=", 1)[1])
        else:
            sets += ["--set", o]
    argv = ["--config", str(DEMO), "--deepspeed_config", str(ds_json), "--set", f"data.path={data}",
            "--set", f"run_dir={run_dir}", *sets]
    code = trainer.main(argv)
    return code, capsys.readouterr().err, run_dir


@pytest.mark.parametrize("overrides, message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_config_value_fails_before_any_work(tmp_path: Path, launch_dataset: Path, overrides: list[str],
                                                message: str, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    code, err, run_dir = _main(tmp_path, launch_dataset, overrides, REPO / "ds_configs" / "cpu_smoke.json",
                               monkeypatch, capsys)
    assert code == 2, err
    assert f"config error: {message}" in err
    assert not run_dir.exists()


@pytest.mark.parametrize("ds, message", [c[1:] for c in JSON_CASES], ids=[c[0] for c in JSON_CASES])
def test_json_contradicting_toml_fails_before_any_work(tmp_path: Path, launch_dataset: Path, ds: dict, message: str,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    ds_json = tmp_path / "ds.json"
    ds_json.write_text(json.dumps(ds))
    code, err, run_dir = _main(tmp_path, launch_dataset, [], ds_json, monkeypatch, capsys)
    assert code == 2, err
    assert err.startswith(f"config error: {ds_json}: ") and message in err
    assert not run_dir.exists()

