"""PretrainModel for every registered method: shapes, counts, gradients, determinism, FLOPs.

The tests are parametrized over the registry (`method_names()`), so a new method gets
them by registering; `VARIANTS` adds the option sets that change a method's graph.
"""
from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from selectivemae_ds.models import ModelConfig, build_model, flops_per_image, get_spec, method_names, patchify, unpatchify
from selectivemae_ds.models.methods import CrossMAEConfig, SelectiveMAEConfig

METHODS = method_names()

# (method, [model] overrides, method config overrides): every method with its defaults,
# plus the options that add parameters or change the selection.
VARIANTS: list[tuple[str, dict[str, Any], dict[str, Any]]] = [(m, {}, {}) for m in METHODS] + [
    ("selectivemae", {"decoder_self_attn": True}, {}),
    ("selectivemae", {}, {"init_select": "softmax", "target_select": "softmax", "similarity": "max", "with_pos": True}),
    ("selectivemae", {}, {"init_select": "random", "target_select": "random", "similarity": "mean"}),
    ("crossmae", {}, {"weight_fm": True}),
    ("crossmae", {"decoder_self_attn": True}, {"weight_fm": True, "use_input": True}),
]
VARIANT_IDS = [f"{m}-{'-'.join(f'{k}={v}' for k, v in {**a, **b}.items()) or 'defaults'}" for m, a, b in VARIANTS]


def tiny_cfg(method: str, img_size: int = 64, **kwargs: object) -> ModelConfig:
    """The tiny encoder with a 2-block, 64-wide decoder: fast on CPU."""
    base: dict[str, object] = dict(
        method=method, size="tiny", img_size=img_size, decoder_depth=2, decoder_dim=64, decoder_heads=4
    )
    base.update(kwargs)
    return ModelConfig(**base)  # type: ignore[arg-type]


def method_cfg(method: str, **overrides: Any) -> Any:
    """The method's default config with some fields replaced."""
    cfg = get_spec(method).default_config()
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def build_variant(method: str, model_kw: dict[str, Any], method_kw: dict[str, Any], img_size: int = 64):
    return build_model(tiny_cfg(method, img_size, **model_kw), method_cfg(method, **method_kw))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("img_size", [64, 96])
def test_counts_shapes_and_disjoint_sets(method: str, img_size: int) -> None:
    torch.manual_seed(0)
    spec = get_spec(method)
    model = build_model(tiny_cfg(method, img_size))
    n = (img_size // 16) ** 2
    visible, targets = spec.counts(spec.default_config(), n)
    assert (model.num_visible, model.num_targets) == (visible, targets)
    x = torch.randn(3, 3, img_size, img_size)
    for progress in (0.1, 0.5, 0.9):
        out = model(x, progress)
        assert out.loss.shape == () and out.per_sample_loss.shape == (3,)
        assert torch.allclose(out.loss, out.per_sample_loss.mean())
        assert set(out.stats) == set(spec.logged_stats) and set(out.terms) == set(spec.loss_terms)
        for value in (*out.stats.values(), *out.terms.values()):
            assert isinstance(value, torch.Tensor) and value.shape == ()
        details = model.forward_details(x, progress)
        assert details["hog"].shape == (3, n)
        assert details["visible_idx"].shape == (3, visible) and details["target_idx"].shape == (3, targets)
        assert details["pred"].shape == (3, targets, 16 * 16 * 3)
        assert details["pred_pixels"].shape == (3, targets, 16 * 16 * 3)
        both = torch.cat([details["visible_idx"], details["target_idx"]], dim=1)
        assert int(both.min()) >= 0 and int(both.max()) < n
        for row in both:  # visible and targets: disjoint, no repeats
            assert len(set(row.tolist())) == visible + targets


def test_builtin_counts_at_224() -> None:
    # ViT-B at 224: N = 196.
    counts = {m: get_spec(m).counts(get_spec(m).default_config(), 196) for m in ("selectivemae", "mae", "crossmae")}
    assert counts == {"selectivemae": (29, 49), "mae": (49, 147), "crossmae": (49, 49)}


def test_selectivemae_logs_its_stage() -> None:
    torch.manual_seed(0)
    model = build_model(tiny_cfg("selectivemae"))
    out = model(torch.randn(3, 3, 64, 64), 0.1)  # progress 0.1 is the near stage
    assert float(out.stats["psts_stage_id"]) == 0.0 and float(out.stats["stage_near"]) == 1.0
    assert float(model(torch.randn(3, 3, 64, 64), 0.9).stats["psts_stage_id"]) == 2.0
    spec = get_spec("selectivemae")
    assert [spec.log_fields(spec.default_config(), p)["psts_stage"] for p in (0.1, 0.5, 0.9)] == ["near", "far", "random"]
    assert get_spec("mae").log_fields(get_spec("mae").default_config(), 0.5) == {}


@pytest.mark.parametrize("method,model_kw,method_kw", VARIANTS, ids=VARIANT_IDS)
def test_every_parameter_gets_a_gradient(method: str, model_kw: dict[str, Any], method_kw: dict[str, Any]) -> None:
    torch.manual_seed(0)
    model = build_variant(method, model_kw, method_kw)
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


@pytest.mark.parametrize("method,model_kw,method_kw", VARIANTS, ids=VARIANT_IDS)
def test_deterministic_under_seed(method: str, model_kw: dict[str, Any], method_kw: dict[str, Any]) -> None:
    x = torch.randn(4, 3, 64, 64)
    runs = []
    for _ in range(2):
        torch.manual_seed(1234)
        model = build_variant(method, model_kw, method_kw)
        out = model(x, 0.376)  # inside the near->far blend: per-sample random stages
        details = model.forward_details(x, 0.376)
        runs.append((out.per_sample_loss, details))
    assert torch.equal(runs[0][0], runs[1][0])
    assert runs[0][1].keys() == runs[1][1].keys()
    for key in runs[0][1]:
        assert torch.equal(runs[0][1][key], runs[1][1][key]), key
    # Another seed draws another selection (the random parts are really random).
    torch.manual_seed(99)
    other = build_variant(method, model_kw, method_kw).forward_details(x, 0.376)
    if method != "selectivemae" or method_kw.get("init_select", "topk") != "topk":
        assert not torch.equal(other["visible_idx"], runs[0][1]["visible_idx"])


@pytest.mark.parametrize("method,model_kw,method_kw", VARIANTS, ids=VARIANT_IDS)
def test_flops_match_a_measured_count(method: str, model_kw: dict[str, Any], method_kw: dict[str, Any]) -> None:
    """The analytic count equals torch's FlopCounterMode on the forward, minus the selection.

    The selection (HOG, PSTS) is outside the counting rule; the math SDPA backend makes
    the attention matmuls visible to the counter (fused CPU kernels are not counted).
    """
    torch.manual_seed(0)
    model = build_variant(method, model_kw, method_kw)
    x = torch.randn(2, 3, 64, 64)
    with sdpa_kernel(SDPBackend.MATH), torch.no_grad():
        with FlopCounterMode(display=False) as total:
            model(x, 0.5)
        patches = model.encoder.embed_patches(x)
        with FlopCounterMode(display=False) as selection:
            model.spec.select(model, x, patches, 0.5)
    measured = (total.get_total_flops() - selection.get_total_flops()) / 2
    assert model.spec.forward_flops(model.method_cfg, model.model_cfg) == measured
    assert model.flops_per_image() == 3 * measured
    assert flops_per_image(model.model_cfg, model.method_cfg) == 3 * measured


def test_flop_order_at_vit_b() -> None:
    per_method = {m: flops_per_image(ModelConfig(method=m, size="base")) for m in ("selectivemae", "mae", "crossmae")}
    # SelectiveMAE does the least work; MAE's full-length decoder the most.
    assert per_method["selectivemae"] < per_method["crossmae"] < per_method["mae"]
    for size in ("small", "base", "large", "huge"):
        assert all(flops_per_image(ModelConfig(method=m, size=size)) > 0 for m in METHODS)


@pytest.mark.parametrize("method", METHODS)
def test_batch_of_one(method: str) -> None:
    torch.manual_seed(0)
    model = build_model(tiny_cfg(method))
    out = model(torch.randn(1, 3, 64, 64), torch.tensor(0.9))
    out.loss.backward()
    assert out.per_sample_loss.shape == (1,) and torch.isfinite(out.loss)


def test_bf16_autocast_is_the_callers_choice() -> None:
    torch.manual_seed(0)
    model = build_model(tiny_cfg("selectivemae"))
    x = torch.randn(2, 3, 64, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, 0.5)
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    out.loss.backward()
    assert model(x, 0.5).loss.dtype == torch.float32  # fp32 without autocast


def test_crossmae_fusion_mixes_every_encoder_layer() -> None:
    torch.manual_seed(0)
    plain = build_model(tiny_cfg("crossmae"))
    fused = build_model(tiny_cfg("crossmae"), CrossMAEConfig(weight_fm=True, use_input=True))
    assert plain.decoder.fuse is None
    # 12 encoder blocks + the input tokens -> one mix per decoder block (2).
    assert tuple(fused.decoder.fuse.weight.shape) == (2, 13)
    assert plain.flops_per_image() < fused.flops_per_image()


def test_flash_attention_without_the_package_is_a_clear_error() -> None:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match=r"model\.attn_impl: 'flash' needs the flash-attn package"):
            build_model(tiny_cfg("selectivemae", attn_impl="flash"))
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
    "model_kwargs,method_kwargs,message",
    [
        ({"size": "xl"}, {}, "model.size: unknown size 'xl' (choose from tiny, small, base, large, huge)"),
        ({"method": "beit"}, {}, "model.method: unknown method 'beit' (choose from selectivemae, mae, crossmae"),
        ({"img_size": 100}, {}, "model.img_size: must be a positive multiple of the patch size 16, got 100"),
        ({"attn_impl": "xformers"}, {}, "model.attn_impl: unknown attention 'xformers'"),
        ({"decoder_heads": 5}, {}, "model.decoder_heads: must divide model.decoder_dim (512), got 5"),
        ({}, {"mask_ratio": 1.5}, "selectivemae.mask_ratio: must be in (0, 1), got 1.5"),
        ({}, {"init_select": "greedy"}, "selectivemae.init_select: unknown value 'greedy'"),
        ({}, {"target_select": "best"}, "selectivemae.target_select: unknown value 'best'"),
        ({}, {"similarity": "min"}, "selectivemae.similarity: unknown value 'min' (choose from paper, max, mean)"),
        ({}, {"init_temperature": 0.0}, "selectivemae.init_temperature: must be > 0, got 0.0"),
        ({}, {"target_temperature": -1.0}, "selectivemae.target_temperature: must be > 0, got -1.0"),
        ({}, {"near_until": 0.7, "far_until": 0.71}, "selectivemae.far_until: must be >= selectivemae.near_until"),
        ({"img_size": 32}, {"mask_ratio": 0.9}, "selectivemae.mask_ratio: leaves no visible patch"),
        ({"img_size": 64}, {"decode_ratio": 0.05}, "selectivemae.decode_ratio: leaves no target patch"),
        ({}, {"decode_ratio": 0.9}, "selectivemae.decode_ratio: 176 targets do not fit"),
        ({"method": "mae"}, {"mask_ratio": 0.0}, "mae.mask_ratio: must be in (0, 1), got 0.0"),
        ({"method": "mae", "decoder_self_attn": True}, {}, "model.decoder_self_attn: mae's decoder is self-attention"),
        ({"method": "crossmae"}, {"use_input": True}, "crossmae.use_input: only applies with crossmae.weight_fm"),
        ({"method": "crossmae"}, {"decode_ratio": 0.8}, "crossmae.decode_ratio: 156 targets do not fit"),
    ],
)
def test_config_errors_name_the_key(model_kwargs: dict[str, Any], method_kwargs: dict[str, Any], message: str) -> None:
    model_cfg = ModelConfig(**model_kwargs)
    with pytest.raises(ValueError) as info:
        build_model(model_cfg, method_cfg(model_cfg.method, **method_kwargs) if model_cfg.method in METHODS else None)
    assert str(info.value).startswith(message)


def test_decoder_presets_follow_the_public_code() -> None:
    assert (ModelConfig(size="small").resolved_decoder_dim(), ModelConfig(size="small").resolved_decoder_heads()) == (256, 8)
    for size in ("base", "large", "huge"):
        assert (ModelConfig(size=size).resolved_decoder_dim(), ModelConfig(size=size).resolved_decoder_heads()) == (512, 16)
    assert ModelConfig(size="small", decoder_dim=512).resolved_decoder_dim() == 512


def test_huge_defaults_to_patch_14_and_decoder_depth_is_the_methods() -> None:
    cfg = ModelConfig(size="huge")
    assert cfg.resolved_patch_size() == 14 and cfg.num_patches() == 256
    assert ModelConfig(method="mae").resolved_decoder_depth() == 8
    assert ModelConfig().resolved_decoder_depth() == 12
    assert ModelConfig(method="crossmae").resolved_decoder_depth() == 12


def test_method_config_defaults_are_the_papers() -> None:
    smae = SelectiveMAEConfig()
    assert (smae.mask_ratio, smae.decode_ratio, smae.init_select, smae.target_select) == (0.85, 0.25, "topk", "topk")
    assert (smae.similarity, smae.with_pos) == ("paper", False)
    assert CrossMAEConfig().mask_ratio == 0.75 and CrossMAEConfig().decode_ratio == 0.25
    assert get_spec("mae").default_config().mask_ratio == 0.75
    assert math.isclose(get_spec("selectivemae").lr_scale(smae), 0.25 / 0.85)
    assert math.isclose(get_spec("crossmae").lr_scale(CrossMAEConfig()), 0.25 / 0.75)
    assert get_spec("mae").lr_scale(get_spec("mae").default_config()) == 1.0
