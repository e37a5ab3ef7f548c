"""HOG scores, PSTS selection and the stage schedule (pure tensor functions, CPU)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from selectivemae_ds.models import get_spec, hog_patch_scores, psts_select, random_select, stage_weights
from selectivemae_ds.models.methods import SelectiveMAEConfig
from selectivemae_ds.models.token_selection import STAGE_FAR, STAGE_NEAR, STAGE_RANDOM, psts_counts

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
REAL_IMAGES = ["OSBS_029.png", "SOAP_031.png", "SOAP_061.png", "2019_YELL_2_541000_4977000_image_crop.jpg"]


def load_normalized(path: Path, side: int) -> torch.Tensor:
    """A real image, resized to side x side, ImageNet-normalized: (1, 3, side, side)."""
    img = Image.open(path).convert("RGB").resize((side, side), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return ((x - IMAGENET_MEAN) / IMAGENET_STD).unsqueeze(0)


def assert_valid_sets(visible: torch.Tensor, target: torch.Tensor, n: int) -> None:
    """Every sample: indices in range, no repeats, visible and targets disjoint."""
    both = torch.cat([visible, target], dim=1)
    assert int(both.min()) >= 0 and int(both.max()) < n
    for row in both:  # test-side check, one sample at a time on purpose
        assert len(set(row.tolist())) == row.numel()


@pytest.mark.parametrize("grid", [4, 6, 14])
@pytest.mark.parametrize("mask_ratio,decode_ratio", [(0.85, 0.25), (0.75, 0.25), (0.5, 0.5), (0.9, 0.05)])
def test_psts_counts_and_disjoint_sets(grid: int, mask_ratio: float, decode_ratio: float) -> None:
    n = grid * grid
    cfg = SelectiveMAEConfig(mask_ratio=mask_ratio, decode_ratio=decode_ratio)
    visible_n, target_n = get_spec("selectivemae").counts(cfg, n)
    if visible_n < 1 or target_n < 1:
        return
    torch.manual_seed(0)
    scores = torch.rand(5, n)
    emb = torch.randn(5, n, 8)
    for progress in (0.0, 0.5, 0.9):
        visible, target, stage = psts_select(scores, emb, progress, cfg)
        assert visible.shape == (5, math.floor(n * (1 - mask_ratio) + 1e-9))
        assert target.shape == (5, math.floor(n * decode_ratio + 1e-9))
        assert stage.shape == (5,)
        assert_valid_sets(visible, target, n)


def test_psts_counts_for_paper_defaults() -> None:
    # ViT-B at 224: N = 196, 29 visible (14 initial, 8 + 7 expansion), 49 targets.
    assert psts_counts(196, SelectiveMAEConfig()) == (14, 8, 7, 49)


def test_initial_set_is_top_scores_and_targets_by_score() -> None:
    cfg = SelectiveMAEConfig()
    n = 64
    scores = torch.randperm(n).float().unsqueeze(0)
    visible, target, _ = psts_select(scores, torch.randn(1, n, 16), 0.0, cfg)
    initial, _, _, num_targets = psts_counts(n, cfg)
    top = set(scores[0].topk(initial).indices.tolist())
    assert set(visible[0, :initial].tolist()) == top
    rest = torch.ones(n, dtype=torch.bool)
    rest[visible[0]] = False
    expected = scores[0].masked_fill(~rest, float("-inf")).topk(num_targets).indices
    assert target[0].tolist() == expected.tolist()


def test_near_picks_more_similar_patches_than_far() -> None:
    """Constructed embeddings: the initial set points along e0; half of the rest
    is close to e0 (similar), the other half points away (dissimilar). With the mean
    rule every far pick stays dissimilar; the nearest/farthest-member rules are checked
    against a reference in test_expansion_follows_the_similarity_rule."""
    cfg = SelectiveMAEConfig(mask_ratio=0.75, decode_ratio=0.25, similarity="mean")
    n, d, batch = 64, 16, 4
    initial, grow1, grow2, _ = psts_counts(n, cfg)
    torch.manual_seed(1)
    scores = torch.zeros(batch, n)
    scores[:, :initial] = 10.0  # the initial set is patches [0, initial)
    e0 = torch.zeros(d)
    e0[0] = 1.0
    emb = 0.1 * torch.randn(batch, n, d)
    similar = torch.arange(initial, n) % 2 == 0
    sim_idx = torch.arange(initial, n)[similar]
    dis_idx = torch.arange(initial, n)[~similar]
    emb[:, :initial] += e0
    emb[:, sim_idx] += e0
    emb[:, dis_idx] -= e0
    grown = grow1 + grow2
    assert grown <= len(sim_idx)

    near_vis, _, near_stage = psts_select(scores, emb, 0.0, cfg)
    far_vis, _, far_stage = psts_select(scores, emb, 0.6, cfg)
    assert (near_stage == STAGE_NEAR).all() and (far_stage == STAGE_FAR).all()
    assert set(near_vis[:, initial:].flatten().tolist()) <= set(sim_idx.tolist())
    assert set(far_vis[:, initial:].flatten().tolist()) <= set(dis_idx.tolist())

    unit = torch.nn.functional.normalize(emb, dim=-1)
    anchor = unit[:, :initial].mean(dim=1, keepdim=True)

    def mean_sim(vis: torch.Tensor) -> float:
        picked = torch.gather(unit, 1, vis[:, initial:, None].expand(-1, -1, d))
        return float((picked * anchor).sum(-1).mean())

    assert mean_sim(near_vis) > 0.5 > -0.5 > mean_sim(far_vis)


def test_stage_schedule_over_progress() -> None:
    cfg = SelectiveMAEConfig(near_until=0.375, far_until=0.75, blend=0.02)
    expected = {
        0.0: (1.0, 0.0, 0.0),
        0.3: (1.0, 0.0, 0.0),
        0.364: (1.0, 0.0, 0.0),
        0.375: (0.5, 0.5, 0.0),
        0.38: (0.25, 0.75, 0.0),
        0.386: (0.0, 1.0, 0.0),
        0.6: (0.0, 1.0, 0.0),
        0.75: (0.0, 0.5, 0.5),
        0.9: (0.0, 0.0, 1.0),
        1.0: (0.0, 0.0, 1.0),
    }
    for progress, weights in expected.items():
        got = stage_weights(progress, cfg)
        assert torch.allclose(got, torch.tensor(weights), atol=1e-5), (progress, got)
        # A 0-dim tensor progress gives the same weights (the engine may pass one).
        assert torch.allclose(stage_weights(torch.tensor(progress), cfg), got)
    hard = SelectiveMAEConfig(blend=0.0)
    assert stage_weights(0.3749, hard).tolist() == [1.0, 0.0, 0.0]
    assert stage_weights(0.375, hard).tolist() == [0.0, 1.0, 0.0]
    assert stage_weights(0.75, hard).tolist() == [0.0, 0.0, 1.0]


def test_blend_window_mixes_stages_per_sample() -> None:
    """Inside a blend window both stages occur in one batch (the public code used
    one sample's mask for the whole batch)."""
    cfg = SelectiveMAEConfig()
    torch.manual_seed(0)
    _, _, stage = psts_select(torch.rand(256, 16), torch.randn(256, 16, 8), cfg.near_until, cfg)
    near = float((stage == STAGE_NEAR).float().mean())
    far = float((stage == STAGE_FAR).float().mean())
    assert 0.35 < near < 0.65 and 0.35 < far < 0.65 and near + far == 1.0
    _, _, stage = psts_select(torch.rand(256, 16), torch.randn(256, 16, 8), cfg.far_until, cfg)
    assert set(stage.unique().tolist()) == {STAGE_FAR, STAGE_RANDOM}


def test_softmax_initial_selection_is_seeded_and_temperature_controls_spread() -> None:
    n = 64
    scores = torch.linspace(0.0, 1.0, n).expand(512, n).contiguous()
    emb = torch.randn(512, n, 8)
    cold = SelectiveMAEConfig(init_select="softmax", init_temperature=0.05)
    hot = SelectiveMAEConfig(init_select="softmax", init_temperature=100.0)
    initial = psts_counts(n, cold)[0]
    torch.manual_seed(3)
    a, a_targets, _ = psts_select(scores, emb, 0.0, cold)
    torch.manual_seed(3)
    b = psts_select(scores, emb, 0.0, cold)[0]
    assert torch.equal(a, b)
    assert_valid_sets(a, a_targets, n)
    hot_vis = psts_select(scores, emb, 0.0, hot)[0]
    # Low temperature concentrates on high scores; high temperature is near uniform.
    assert float(a[:, :initial].float().mean()) > 50.0
    assert abs(float(hot_vis[:, :initial].float().mean()) - (n - 1) / 2) < 3.0


def test_random_select_counts_and_disjoint() -> None:
    visible, target = random_select(7, 196, 49, 147, torch.device("cpu"))
    assert visible.shape == (7, 49) and target.shape == (7, 147)
    assert_valid_sets(visible, target, 196)


@pytest.mark.parametrize("name", REAL_IMAGES)
def test_hog_ranks_textured_above_flat_on_real_images(assets_dir: Path, name: str) -> None:
    patch = 16
    x = load_normalized(assets_dir / name, 128)
    # Flatten one patch of the real image to its mean colour: a flat patch in context.
    flat_r, flat_c = 3, 4
    block = x[:, :, flat_r * patch : (flat_r + 1) * patch, flat_c * patch : (flat_c + 1) * patch]
    x[:, :, flat_r * patch : (flat_r + 1) * patch, flat_c * patch : (flat_c + 1) * patch] = block.mean(
        dim=(2, 3), keepdim=True
    )
    scores = hog_patch_scores(x, patch)[0]
    assert scores.shape == (64,)
    assert float(scores.std()) > 0.0  # the public code's score is identically zero
    pixel_std = x.unfold(2, patch, patch).unfold(3, patch, patch).std(dim=(-1, -2)).mean(1).flatten()
    textured = int(pixel_std.argmax())
    flat = flat_r * 8 + flat_c
    assert scores[textured] > scores[flat]
    # The flattened patch ranks in the bottom few (its border still sees the neighbours).
    assert int((scores < scores[flat]).sum()) <= 4
    # Removing fine texture (a 4x4 box blur of the real image) lowers the
    # score of (almost) every patch, not just the extremes.
    blurred = torch.nn.functional.avg_pool2d(torch.nn.functional.pad(x, (2, 1, 2, 1), mode="replicate"), 4, stride=1)
    blurred_scores = hog_patch_scores(blurred, patch)[0]
    assert float((blurred_scores < scores).float().mean()) > 0.9


def test_hog_flat_image_scores_zero_and_is_batched() -> None:
    flat = torch.full((2, 3, 32, 48), 0.3)
    assert torch.allclose(hog_patch_scores(flat, 16), torch.zeros(2, 6))
    x = torch.randn(3, 3, 32, 32)
    batched = hog_patch_scores(x, 16)
    single = torch.cat([hog_patch_scores(x[i : i + 1], 16) for i in range(3)])
    assert torch.allclose(batched, single)


def reference_expansion(scores: torch.Tensor, emb: torch.Tensor, cfg: SelectiveMAEConfig, stage: str) -> list[list[int]]:
    """PSTS's visible sets, one sample at a time with Python lists: the rule as written in docs/model.md."""
    reduce_near, reduce_far = {"paper": (max, min), "max": (max, max),
                               "mean": (lambda v: sum(v) / len(v),) * 2}[cfg.similarity]
    initial, grow1, grow2, _ = psts_counts(scores.shape[1], cfg)
    unit = torch.nn.functional.normalize(emb.double(), dim=-1)
    out = []
    for b in range(scores.shape[0]):
        chosen = scores[b].topk(initial).indices.tolist()
        for count in (grow1, grow2):
            rest = [i for i in range(scores.shape[1]) if i not in chosen]
            sims = {i: [float(unit[b, i] @ unit[b, j]) for j in chosen] for i in rest}
            if stage == "near":
                ranked = sorted(rest, key=lambda i: -reduce_near(sims[i]))
            else:
                ranked = sorted(rest, key=lambda i: reduce_far(sims[i]))
            chosen += ranked[:count]
        out.append(chosen)
    return out


@pytest.mark.parametrize("similarity", ["paper", "max", "mean"])
@pytest.mark.parametrize("stage,progress", [("near", 0.1), ("far", 0.5)])
def test_expansion_follows_the_similarity_rule(similarity: str, stage: str, progress: float) -> None:
    cfg = SelectiveMAEConfig(mask_ratio=0.75, similarity=similarity, blend=0.0)
    n = 36  # 9 visible: 4 initial, 3 + 2 expansion
    torch.manual_seed(5)
    scores, emb = torch.rand(6, n), torch.randn(6, n, 8)
    visible, _, stages = psts_select(scores, emb, progress, cfg)
    assert set(stages.tolist()) == {STAGE_NEAR if stage == "near" else STAGE_FAR}
    assert visible.tolist() == reference_expansion(scores, emb, cfg, stage)


def test_similarity_rules_differ_on_the_same_inputs() -> None:
    """The three rules are different rules: on random embeddings they pick different sets."""
    torch.manual_seed(6)
    scores, emb = torch.rand(32, 36), torch.randn(32, 36, 8)
    picks = {}
    for rule in ("paper", "max", "mean"):
        picks[rule] = psts_select(scores, emb, 0.5, SelectiveMAEConfig(mask_ratio=0.75, similarity=rule, blend=0.0))[0]
    assert not torch.equal(picks["paper"], picks["max"]) and not torch.equal(picks["max"], picks["mean"])
    # near uses the nearest selected patch under both paper and max: identical there.
    near = {rule: psts_select(scores, emb, 0.1, SelectiveMAEConfig(mask_ratio=0.75, similarity=rule))[0]
            for rule in ("paper", "max")}
    assert torch.equal(near["paper"], near["max"])


def test_with_pos_compares_embeddings_plus_positions() -> None:
    from selectivemae_ds.models import ModelConfig, build_model

    x = torch.randn(4, 3, 64, 64)
    model_cfg = ModelConfig(size="tiny", img_size=64, decoder_depth=1, decoder_dim=64, decoder_heads=4)
    picked = {}
    for with_pos in (False, True):
        torch.manual_seed(0)
        model = build_model(model_cfg, SelectiveMAEConfig(with_pos=with_pos, similarity="max"))
        patches = model.encoder.embed_patches(x).detach()
        torch.manual_seed(1)
        picked[with_pos] = model.spec.select(model, x, patches, 0.1).visible_idx
        torch.manual_seed(1)
        expected_emb = patches + model.encoder.pos_embed[:, 1:] if with_pos else patches
        expected = psts_select(hog_patch_scores(x, 16), expected_emb, 0.1, model.method_cfg)[0]
        assert torch.equal(picked[with_pos], expected)
    assert not torch.equal(picked[False], picked[True])


@pytest.mark.parametrize("rule", ["topk", "softmax", "random"])
def test_target_select_rules(rule: str) -> None:
    """Targets never overlap the visible set; topk takes the best-scored, random is unbiased."""
    n, batch = 64, 512
    # Inputs from their own generator: drawn from the global one they could equal the
    # selection's own uniforms (same seed, same position in the stream).
    inputs = torch.Generator().manual_seed(7)
    scores = torch.rand(batch, n, generator=inputs)
    emb = torch.randn(batch, n, 8, generator=inputs)
    cfg = SelectiveMAEConfig(target_select=rule, target_temperature=0.5)
    torch.manual_seed(2)
    visible, target, _ = psts_select(scores, emb, 0.9, cfg)
    assert_valid_sets(visible, target, n)
    hidden = torch.ones(batch, n, dtype=torch.bool).scatter_(1, visible, False)
    hidden_mean = float((scores * hidden).sum() / hidden.sum())
    target_mean = float(torch.gather(scores, 1, target).mean())
    best = scores.masked_fill(~hidden, -1.0).topk(target.shape[1], dim=1).values
    if rule == "topk":
        assert torch.equal(torch.gather(scores, 1, target), best)
    elif rule == "softmax":  # favours high scores, but samples: between uniform and top-k
        assert hidden_mean + 0.1 < target_mean < float(best.mean()) - 0.02
    else:
        assert abs(target_mean - hidden_mean) < 0.02


def test_random_initial_selection_ignores_scores() -> None:
    n, batch = 64, 512
    scores = torch.linspace(0.0, 1.0, n).expand(batch, n).contiguous()
    torch.manual_seed(4)
    visible = psts_select(scores, torch.randn(batch, n, 8), 0.0, SelectiveMAEConfig(init_select="random"))[0]
    initial = psts_counts(n, SelectiveMAEConfig())[0]
    assert abs(float(visible[:, :initial].float().mean()) - (n - 1) / 2) < 2.0
