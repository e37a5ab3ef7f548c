"""Parameter groups and the merge of the TOML into the DeepSpeed JSON (no engine start)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from selectivemae_ds.config import load_config
from selectivemae_ds.engine import load_ds_json, merge_ds_config, param_groups
from selectivemae_ds.models import build_model

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def cfg(tmp_path: Path):
    return load_config(REPO / "configs" / "demo.toml", [f"data.path={tmp_path}"])


def test_no_decay_on_norms_and_biases_only(cfg) -> None:
    model = build_model(cfg.model, cfg.method_cfg)
    decay, no_decay = param_groups(model, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    undecayed = {names[id(p)] for p in no_decay["params"]}
    decayed = {names[id(p)] for p in decay["params"]}
    # As MAE's, CrossMAE's and the public SelectiveMAE code's timm groups: the tokens decay.
    assert {"encoder.cls_token", "decoder.mask_token"} <= decayed
    assert all(n.endswith(".bias") or "norm" in n for n in undecayed)
    assert all(model.get_parameter(n).ndim >= 2 for n in decayed)
    assert len(decayed) + len(undecayed) == len(list(model.parameters()))


@pytest.mark.parametrize("name", ["zero1", "zero2", "zero3", "cpu_smoke"])
def test_shipped_json_is_filled_from_the_toml(cfg, name: str) -> None:
    ds = merge_ds_config(load_ds_json(REPO / "ds_configs" / f"{name}.json"), cfg, world_size=2)
    assert ds["train_batch_size"] == 8
    assert ds["train_micro_batch_size_per_gpu"] == 2
    assert ds["gradient_accumulation_steps"] == 2
    assert ds["gradient_clipping"] == cfg.optim.grad_clip
    assert "optimizer" not in ds and "scheduler" not in ds


def test_matching_keys_are_accepted(cfg) -> None:
    ds = merge_ds_config({"zero_optimization": {"stage": 2}, "train_batch_size": 8, "gradient_clipping": "auto"},
                         cfg, world_size=1)
    assert ds["gradient_accumulation_steps"] == 4 and ds["gradient_clipping"] == 1.0


@pytest.mark.parametrize("extra, message", [
    ({"train_batch_size": 512}, '"train_batch_size": 512 contradicts train.global_batch = 8 from the TOML'),
    ({"train_micro_batch_size_per_gpu": 4}, '"train_micro_batch_size_per_gpu": 4 contradicts train.micro_batch = 2'),
    ({"gradient_accumulation_steps": 1}, '"gradient_accumulation_steps": 1 contradicts train.global_batch'),
    ({"gradient_clipping": 5.0}, '"gradient_clipping": 5.0 contradicts optim.grad_clip = 1.0'),
    ({"optimizer": {"type": "Adam"}}, 'remove "optimizer"; it contradicts the TOML'),
    ({"scheduler": {"type": "WarmupLR"}}, 'remove "scheduler"'),
    ({"zero_optimization": {"stage": 0}}, '"zero_optimization.stage" is 0'),
    ({"fp16": {"enabled": True}}, '"fp16" is not supported'),
    ({"bf16": {"enabled": True, "check_grad_overflow": False}}, '"bf16.check_grad_overflow" must stay true'),
])
def test_contradicting_json_is_refused(cfg, tmp_path: Path, extra: dict, message: str) -> None:
    ds = {"zero_optimization": {"stage": 2}, **extra}
    with pytest.raises(ValueError) as e:
        merge_ds_config(ds, cfg, world_size=2, source="my.json")
    assert str(e.value).startswith("my.json: ") and message in str(e.value)


def test_world_size_must_split_the_batch(cfg) -> None:
    with pytest.raises(ValueError, match=r"train.global_batch: 8 is not a multiple of train.micro_batch \(2\) x 3 ranks"):
        merge_ds_config({"zero_optimization": {"stage": 2}}, cfg, world_size=3)


def test_unreadable_json(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="--deepspeed_config .*bad.json: cannot read it as JSON"):
        load_ds_json(bad)
    assert load_ds_json(None) == {}
    assert json.loads((REPO / "ds_configs" / "zero3.json").read_text())["bf16"]["enabled"] is True
