"""CtxMIM and SimMIM beyond the registry's parametrized tests (tests/test_model.py):
block masking, the context branch, the consistency term, SimMIM as CtxMIM's masked
term, config errors, and a 2-rank training run of each with an exact resume."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from selectivemae_ds.errors import ConfigError
from selectivemae_ds.models import ModelConfig, build_model, flops_per_image, get_spec, method_names
from selectivemae_ds.models.methods.ctxmim import consistency
from tests.launch import fp32_weights, logged, method_args, pretrain


def tiny(method: str, img_size: int = 64, **model_kw: object) -> ModelConfig:
    return ModelConfig(method=method, size="tiny", img_size=img_size, **model_kw)  # type: ignore[arg-type]


def method_cfg(method: str, **overrides: object):
    cfg = get_spec(method).default_config()
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def test_registered_and_counts_at_the_papers_sizes() -> None:
    assert {"simmim", "ctxmim"} <= set(method_names())
    for name in ("simmim", "ctxmim"):
        spec = get_spec(name)
        # 192 px (the paper's crops): 12 x 12 patches, 36 blocks of 2 x 2, ceil(21.6) = 22 masked blocks.
        assert spec.counts(spec.default_config(), 144) == (144 - 88, 88)
        # 224 px: 49 blocks, ceil(29.4) = 30 masked.
        assert spec.counts(spec.default_config(), 196) == (196 - 120, 120)


def test_masked_patches_come_in_whole_blocks() -> None:
    torch.manual_seed(0)
    model = build_model(tiny("simmim", 128))  # 8 x 8 patches, 16 blocks of 2 x 2, 10 masked
    sel = model.spec.select(model, torch.zeros(5, 3, 128, 128), torch.zeros(5, 64, 192), 0.0)
    assert sel.target_idx.shape == (5, 40) and sel.visible_idx.shape == (5, 24)
    for row in sel.target_idx:
        hidden = torch.zeros(64, dtype=torch.bool)
        hidden[row] = True
        blocks = hidden.view(4, 2, 4, 2).permute(0, 2, 1, 3).reshape(16, 4)
        assert (blocks.all(dim=1) | ~blocks.any(dim=1)).all()  # every block all masked or all kept
        assert int(blocks.all(dim=1).sum()) == 10


def test_context_branch_sees_no_mask_token() -> None:
    """A NaN mask token poisons the masked branch only; the context prediction is the
    head on the encoder's plain forward_features (the timm path) of the image."""
    torch.manual_seed(0)
    model = build_model(tiny("ctxmim", norm_pix_loss=False))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        model.decoder.mask_token.fill_(float("nan"))
        details = model.forward_details(x, 0.5)
        expected = model.decoder.head(model.encoder.forward_features(x)[:, 1:])
    assert torch.isnan(details["pred"]).all()
    assert torch.isfinite(details["panel_context"]).all()
    assert torch.allclose(details["panel_context"], expected, atol=1e-6)  # norm_pix off: pixels = prediction


def test_consistency_is_zero_when_the_branches_agree() -> None:
    torch.manual_seed(0)
    a = torch.randn(3, 5, 12, requires_grad=True)
    b = a.detach().clone().requires_grad_(True)
    for kind in ("l1", "l2"):
        assert torch.equal(consistency(a, b, "context", kind), torch.zeros(3))
    # Through the model: a zero head predicts its bias on both branches, so they agree exactly.
    model = build_model(tiny("ctxmim"))
    with torch.no_grad():
        model.decoder.head.weight.zero_()
    out = model(torch.randn(2, 3, 64, 64), 0.5)
    assert float(out.terms["cc"].detach()) == 0.0
    assert float(out.terms["re"].detach()) > 0.0 and float(out.terms["pr"].detach()) > 0.0


@pytest.mark.parametrize("detach, moved", [("context", "masked"), ("masked", "context"), ("none", "both")])
def test_consistency_detaches_the_chosen_side(detach: str, moved: str) -> None:
    torch.manual_seed(0)
    masked = torch.randn(2, 3, 4, requires_grad=True)
    context = torch.randn(2, 3, 4, requires_grad=True)
    consistency(masked, context, detach, "l1").sum().backward()
    assert (masked.grad is not None) == (moved in ("masked", "both"))
    assert (context.grad is not None) == (moved in ("context", "both"))


def test_simmim_loss_is_ctxmim_masked_term() -> None:
    x = torch.randn(3, 3, 64, 64)
    torch.manual_seed(7)
    ctx = build_model(tiny("ctxmim"), method_cfg("ctxmim", weight_pr=0.0, weight_cc=0.0))
    sim = build_model(tiny("simmim"))
    sim.load_state_dict(ctx.state_dict())  # same parameters: encoder, mask token, head
    torch.manual_seed(11)
    a = ctx(x, 0.3)
    torch.manual_seed(11)
    b = sim(x, 0.3)
    assert torch.equal(a.loss, b.loss) and torch.equal(a.terms["re"], b.loss)
    assert float(a.terms["pr"].detach()) == float(a.terms["cc"].detach()) == 0.0
    # With the context branch on, the terms add up to the loss and the masked term is unchanged.
    ctx.method_cfg.weight_pr = ctx.method_cfg.weight_cc = 1.0
    torch.manual_seed(11)
    c = ctx(x, 0.3)
    assert torch.equal(c.terms["re"], b.loss)
    assert torch.allclose(c.loss, c.terms["re"] + c.terms["pr"] + c.terms["cc"])
    assert float(c.loss.detach()) > float(b.loss.detach())


def test_ctxmim_costs_two_encoder_passes() -> None:
    per = {m: flops_per_image(ModelConfig(method=m, size="base")) for m in ("selectivemae", "mae", "simmim", "ctxmim")}
    assert per["selectivemae"] < per["mae"] < per["simmim"] < per["ctxmim"]
    assert 1.9 < per["ctxmim"] / per["simmim"] < 2.1


@pytest.mark.parametrize(
    "method, model_kw, overrides, message",
    [
        ("simmim", {"img_size": 96}, {"mask_block": 4}, r"simmim.mask_block: 4 does not divide the 6 x 6 patch grid"),
        ("simmim", {}, {"mask_block": 0}, r"simmim.mask_block: must be >= 1 patch, got 0"),
        ("simmim", {}, {"loss": "huber"}, r"simmim.loss: unknown value 'huber' \(choose from l1, l2\)"),
        ("ctxmim", {}, {"mask_ratio": 1.0}, r"ctxmim.mask_ratio: must be in \(0, 1\)"),
        ("ctxmim", {}, {"cc_detach": "both"}, r"ctxmim.cc_detach: unknown value 'both'"),
        ("ctxmim", {}, {"weight_cc": -1.0}, r"ctxmim.weight_cc: must be a finite number >= 0, got -1.0"),
        ("ctxmim", {}, {"weight_re": 0.0, "weight_pr": 0.0, "weight_cc": 0.0}, r"the three loss weights are all 0"),
    ],
)
def test_config_errors_name_the_key(method: str, model_kw: dict, overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_model(tiny(method, **model_kw), method_cfg(method, **overrides))


@pytest.mark.parametrize("name", ["ctxmim_vitb", "simmim_vitb"])
def test_recipes_parse_and_name_their_source(tmp_path: Path, name: str) -> None:
    from selectivemae_ds.config import load_config

    path = Path(__file__).resolve().parents[1] / "configs" / f"{name}.toml"
    cfg = load_config(path, [f"data.path={tmp_path}"])
    method = name.removesuffix("_vitb")
    assert (cfg.model.method, cfg.model.size, cfg.model.img_size, cfg.model.norm_pix_loss) == (method, "base", 192, False)
    assert (cfg.method_cfg.mask_ratio, cfg.method_cfg.mask_block, cfg.method_cfg.loss) == (0.6, 2, "l1")
    assert (cfg.optim.lr, cfg.optim.beta1, cfg.optim.beta2, cfg.train.epochs) == (1e-5, 0.9, 0.999, 200)
    header = path.read_text()
    assert "Context-Enhanced Masked" in header and "Deviations" in header
    build_model(cfg.model, cfg.method_cfg)  # the 12 x 12 grid takes 2 x 2 blocks


@pytest.mark.slow
@pytest.mark.parametrize("method", ["simmim", "ctxmim"])
def test_two_rank_run_resumes_exactly(tmp_path: Path, launch_dataset: Path, straight_run, method: str) -> None:
    """4 steps on 2 CPU ranks (ZeRO-2) with checkpoints at 2 and 4 (the session's shared run,
    also resumed on 1 rank in tests/test_checkpoint.py); a run resumed from step 2 logs the
    same losses (every term) and ends with the same weights; the picture is drawn."""
    straight, resumed = straight_run("zero2.json", method), tmp_path / "resumed"
    mid = straight / "checkpoints" / "step_00000002"
    r = pretrain(resumed, launch_dataset, "zero2.json", *method_args(method), "--resume", str(mid))
    assert "[resume] step=2" in r.stdout
    a, b = logged(straight), logged(resumed)
    assert sorted(b) == [3, 4]
    keys = ["loss", *(f"loss_{t}" for t in get_spec(method).loss_terms)]
    for step in (3, 4):
        for key in keys:
            assert b[step][key] == pytest.approx(a[step][key], rel=1e-6, abs=1e-7), (step, key)
    if method == "ctxmim":
        assert a[1]["loss"] == pytest.approx(a[1]["loss_re"] + a[1]["loss_pr"] + a[1]["loss_cc"], rel=1e-5)
    assert a[1]["loss"] != a[4]["loss"]
    wa = fp32_weights(straight / "checkpoints" / "step_00000004")
    wb = fp32_weights(resumed / "checkpoints" / "step_00000004")
    assert wa.keys() == wb.keys() and "decoder.mask_token" in wa
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key
    assert list((straight / "tensorboard").iterdir())
