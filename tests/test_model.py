"""PretrainModel for the three methods: shapes, counts, gradients, determinism, configs, FLOPs."""
from __future__ import annotations

import math

import pytest
import torch

from selectivemae_ds.models import MaskingConfig, ModelConfig, build_model, flops_per_image, patchify, unpatchify

METHODS = ["selectivemae", "mae", "crossmae"]


def tiny_cfg(method: str, img_size: int = 64, **kwargs: object) -> ModelConfig:
    """The tiny encoder with a 2-block, 64-wide decoder: fast on CPU."""
    base: dict[str, object] = dict(
        method=method, size="tiny", img_size=img_size, decoder_depth=2, decoder_dim=64, decoder_heads=4
    )
    base.update(kwargs)
    return ModelConfig(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("img_size", [64, 96])
def test_counts_and_shapes(method: str, img_size: int) -> None:
    torch.manual_seed(0)
    masking = MaskingConfig()
    model = build_model(tiny_cfg(method, img_size), masking)
    n = (img_size // 16) ** 2
    visible, targets = masking.counts(method, n)
    if method == "selectivemae":
        assert visible == math.floor(n * 0.15 + 1e-9) and targets == math.floor(n * 0.25 + 1e-9)
    elif method == "mae":
        assert visible == n // 4 and targets == n - n // 4
    else:
        assert visible == n // 4 and targets == math.floor(n * 0.25 + 1e-9)
    x = torch.randn(3, 3, img_size, img_size)
    out = model(x, 0.1)
    assert out.loss.shape == () and out.per_sample_loss.shape == (3,)
    assert torch.allclose(out.loss, out.per_sample_loss.mean())
    assert int(out.stats["visible"]) == visible and int(out.stats["targets"]) == targets
    for key in ("stage", "stage_near", "stage_far", "stage_random"):
        assert isinstance(out.stats[key], torch.Tensor) and out.stats[key].shape == ()
    expected_stage = 0.0 if method == "selectivemae" else 2.0  # progress 0.1 is the near stage
    assert float(out.stats["stage"]) == expected_stage
    details = model.forward_details(x, 0.1)
    assert details["hog"].shape == (3, n)
    assert details["visible_idx"].shape == (3, visible)
    assert details["target_idx"].shape == (3, targets)
    assert details["pred"].shape == (3, targets, 16 * 16 * 3)
    assert details["pred_pixels"].shape == (3, targets, 16 * 16 * 3)
    for vis, tgt in zip(details["visible_idx"], details["target_idx"]):
        assert len(set(vis.tolist()) | set(tgt.tolist())) == visible + targets


@pytest.mark.parametrize(
    "method,extra",
    [("selectivemae", {}), ("selectivemae", {"decoder_self_attn": True}), ("mae", {}), ("crossmae", {})],
)
def test_every_parameter_gets_a_gradient(method: str, extra: dict[str, object]) -> None:
    torch.manual_seed(0)
    model = build_model(tiny_cfg(method, **extra), MaskingConfig())
    model(torch.randn(2, 3, 64, 64), 0.5).loss.backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing
    zero = [name for name, p in model.named_parameters() if float(p.grad.abs().sum()) == 0.0]  # type: ignore[union-attr]
    assert not zero
    # The position tables are saved but never trained.
    names = {name for name, _ in model.named_parameters()}
    assert "encoder.pos_embed" not in names and "decoder.pos_embed" not in names
    assert "encoder.pos_embed" in model.state_dict()
    assert model.no_weight_decay() <= names


@pytest.mark.parametrize("method", METHODS)
def test_deterministic_under_seed(method: str) -> None:
    x = torch.randn(4, 3, 64, 64)
    losses, indices = [], []
    for _ in range(2):
        torch.manual_seed(1234)
        model = build_model(tiny_cfg(method), MaskingConfig(init_select="softmax"))
        out = model(x, 0.376)  # inside the near->far blend: per-sample random stages
        losses.append(out.per_sample_loss)
        details = model.forward_details(x, 0.376)
        indices.append((details["visible_idx"], details["target_idx"], details["stage"]))
    assert torch.equal(losses[0], losses[1])
    for a, b in zip(indices[0], indices[1]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("method", METHODS)
def test_batch_of_one(method: str) -> None:
    torch.manual_seed(0)
    model = build_model(tiny_cfg(method), MaskingConfig())
    out = model(torch.randn(1, 3, 64, 64), torch.tensor(0.9))
    out.loss.backward()
    assert out.per_sample_loss.shape == (1,) and torch.isfinite(out.loss)


def test_bf16_autocast_is_the_callers_choice() -> None:
    torch.manual_seed(0)
    model = build_model(tiny_cfg("selectivemae"), MaskingConfig())
    x = torch.randn(2, 3, 64, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, 0.5)
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    out.loss.backward()
    assert model(x, 0.5).loss.dtype == torch.float32  # fp32 without autocast


def test_flash_attention_without_the_package_is_a_clear_error() -> None:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match=r"model\.attn_impl: 'flash' needs the flash-attn package"):
            build_model(tiny_cfg("selectivemae", attn_impl="flash"), MaskingConfig())
    else:
        pytest.skip("flash-attn is installed")


def test_patchify_roundtrip_and_layout() -> None:
    x = torch.randn(2, 3, 32, 48)
    patches = patchify(x, 16)
    assert patches.shape == (2, 6, 16 * 16 * 3)
    # Patch 4 is row 1, col 1; its first value is pixel (16, 16) channel 0.
    assert patches[0, 4, 0] == x[0, 0, 16, 16] and patches[0, 4, 1] == x[0, 1, 16, 16]
    assert torch.equal(unpatchify(patches, 16, 2, 3), x)
    with pytest.raises(ValueError, match="count patches"):
        unpatchify(patches, 16, 32, 48)


@pytest.mark.parametrize(
    "model_kwargs,masking_kwargs,message",
    [
        ({"size": "xl"}, {}, "model.size: unknown size 'xl' (choose from tiny, small, base, large, huge)"),
        ({"method": "beit"}, {}, "model.method: unknown method 'beit'"),
        ({"img_size": 100}, {}, "model.img_size: must be a positive multiple of the patch size 16, got 100"),
        ({"attn_impl": "xformers"}, {}, "model.attn_impl: unknown attention 'xformers'"),
        ({"decoder_heads": 5}, {}, "model.decoder_heads: must divide model.decoder_dim (512), got 5"),
        ({}, {"mask_ratio": 1.5}, "masking.mask_ratio: must be in (0, 1), got 1.5"),
        ({}, {"init_select": "greedy"}, "masking.init_select: unknown selection 'greedy'"),
        ({}, {"temperature": 0.0}, "masking.temperature: must be > 0, got 0.0"),
        ({}, {"near_until": 0.7, "far_until": 0.71}, "masking.far_until: must be >= masking.near_until"),
        ({"img_size": 32}, {"mask_ratio": 0.9}, "masking.mask_ratio: leaves no visible patch"),
        ({"img_size": 64}, {"decode_ratio": 0.05}, "masking.decode_ratio: leaves no target patch"),
        ({}, {"decode_ratio": 0.9}, "masking.decode_ratio: 176 targets do not fit"),
    ],
)
def test_config_errors_name_the_key(
    model_kwargs: dict[str, object], masking_kwargs: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError) as info:
        build_model(ModelConfig(**model_kwargs), MaskingConfig(**masking_kwargs))  # type: ignore[arg-type]
    assert str(info.value).startswith(message)


def test_huge_defaults_to_patch_14() -> None:
    cfg = ModelConfig(size="huge")
    assert cfg.resolved_patch_size() == 14 and cfg.num_patches() == 256
    assert ModelConfig(method="mae").resolved_decoder_depth() == 8
    assert ModelConfig().resolved_decoder_depth() == 12


def test_flop_count() -> None:
    masking = MaskingConfig()
    per_method = {m: flops_per_image(ModelConfig(method=m, size="base"), masking) for m in METHODS}
    # SelectiveMAE does the least work; MAE's full-length decoder the most.
    assert per_method["selectivemae"] < per_method["crossmae"] < per_method["mae"]
    # ViT-B blocks on all 197 tokens: the well-known ~17.5 G multiply-accumulates
    # (what fvcore/timm tables call "GFLOPs"), i.e. ~35 G FLOPs by our 2 x MAC rule.
    enc_full = 12 * (24 * 197 * 768**2 + 4 * 197**2 * 768)
    assert 34.0e9 < enc_full < 36.0e9
    for size in ("small", "base", "large", "huge"):
        values = [flops_per_image(ModelConfig(method=m, size=size), masking) for m in METHODS]
        assert all(v > 0 for v in values)
    # Hand count for the tiny selectivemae model of these tests (N=16, V=2, T=4).
    cfg = tiny_cfg("selectivemae")
    d, dd, v, t, n = 192, 64, 2, 4, 16
    forward = (
        2 * n * 768 * d
        + 12 * (24 * (1 + v) * d * d + 4 * (1 + v) ** 2 * d)
        + 2 * (1 + v) * d * dd
        + 2 * (20 * t * dd * dd + 4 * (1 + v) * dd * dd + 4 * t * (1 + v) * dd)
        + 2 * t * dd * 768
    )
    assert flops_per_image(cfg, masking) == pytest.approx(3 * forward)
    model = build_model(cfg, masking)
    assert model.flops_per_image() == pytest.approx(3 * forward)
