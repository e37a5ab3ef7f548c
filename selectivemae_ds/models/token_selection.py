"""HOG patch scores and PSTS token selection, as pure batched tensor functions.

Everything here runs on the device of its inputs with static shapes: no Python
loop over samples, no `.item()`/`.cpu()`/`nonzero`, so a training step never
waits for the host. The only Python loops run over constants (9 orientation
bins, 2 expansion sub-steps).

PSTS (progressive semantic token selection), per image with N patches (the
options are `SelectiveMAEConfig` fields; docs/model.md gives their sources):
1. `hog_patch_scores`: each patch's HOG gradient energy.
2. Initial set of K0 = floor(N(1-m)/2) patches picked by score (`init_select`:
   top-k, sampled from softmax(standardized score / T) by Gumbel top-k, or uniform).
3. Expansion to V = floor(N(1-m)) patches in two sub-steps. Each sub-step
   ranks the remaining patches by their cosine similarity to the selected set
   (patch embeddings, detached, plus positions with `with_pos`) and, per sample,
   takes the nearest (stage `near`), the farthest (`far`) or random ones
   (`random`). `similarity` says how a patch's similarity to a SET is measured:
   `paper` (its nearest selected patch for near, its farthest for far), `max`
   (its nearest selected patch for both, as the public code) or `mean`.
   The stage of every sample is drawn from `stage_weights(progress)`, so the
   blend windows mix stages across samples of one batch (the public code
   applied one sample's mask to the whole batch).
4. Targets: T = floor(N r) non-visible patches picked by score (`target_select`,
   the same three rules as the initial set).
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:
    from .methods.selectivemae import SelectiveMAEConfig

STAGE_NEAR = 0
STAGE_FAR = 1
STAGE_RANDOM = 2
STAGE_NAMES: tuple[str, str, str] = ("near", "far", "random")


def sobel_gradients(imgs: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel Sobel gradients. imgs: (B, C, H, W) -> gx, gy: (B, C, H, W) float32.

    Replicate padding keeps the image border from looking like an edge.
    """
    b, c, h, w = imgs.shape
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], device=imgs.device)
    # One grouped conv computes (gx, gy) for every channel: weight (2C, 1, 3, 3).
    weight = torch.stack([kx, kx.t()]).unsqueeze(1).repeat(c, 1, 1, 1)
    padded = F.pad(imgs.float(), (1, 1, 1, 1), mode="replicate")
    grads = F.conv2d(padded, weight, groups=c).view(b, c, 2, h, w)
    return grads[:, :, 0], grads[:, :, 1]


@torch.no_grad()
def hog_histograms(imgs: Tensor, patch: int, bins: int = 9) -> Tensor:
    """HOG orientation histograms per patch. imgs: (B, 3, H, W) -> (B, N, bins).

    Per pixel, the channel with the largest gradient magnitude gives the
    gradient (Dalal-Triggs); its unsigned orientation in [0, pi) votes into
    `bins` bins with linear (soft) interpolation between the two nearest bin
    centres, weighted by the magnitude. Each patch's histogram is the mean of
    its pixels' votes, i.e. un-normalized: a flat patch has a near-zero
    histogram. Computed in fp32 with autocast off, whatever the caller uses.
    """
    b, _, h, w = imgs.shape
    if h % patch != 0 or w % patch != 0:
        raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {patch}")
    with torch.autocast(device_type=imgs.device.type, enabled=False):
        gx, gy = sobel_gradients(imgs)
        mag_c = torch.sqrt(gx * gx + gy * gy)
        best = mag_c.argmax(dim=1, keepdim=True)
        gx = torch.gather(gx, 1, best)
        gy = torch.gather(gy, 1, best)
        mag = torch.gather(mag_c, 1, best)  # (B, 1, H, W)
        theta = torch.remainder(torch.atan2(gy, gx), math.pi)
        # Bin k is centred at (k + 0.5) * pi / bins; orientation wraps around.
        pos = theta * (bins / math.pi) - 0.5
        lo = torch.floor(pos)
        frac = pos - lo
        lo = torch.remainder(lo, bins)
        hi = torch.remainder(lo + 1, bins)
        hist = []
        for k in range(bins):  # constant loop: one (B, 1, H, W) temporary at a time
            vote = mag * ((lo == k).float() * (1.0 - frac) + (hi == k).float() * frac)
            hist.append(F.avg_pool2d(vote, patch))
        out = torch.cat(hist, dim=1)  # (B, bins, H/p, W/p)
    return out.flatten(2).transpose(1, 2)


@torch.no_grad()
def hog_patch_scores(imgs: Tensor, patch: int, bins: int = 9) -> Tensor:
    """HOG score per patch. imgs: (B, 3, H, W) -> (B, N) float32, N = (H/p)(W/p).

    The score is the patch's gradient energy: the L2 norm of its
    un-normalized orientation histogram (`hog_histograms`). It is 0 for a
    flat patch, grows with contrast and texture, and favours coherent edges
    (votes concentrated in few bins) over isotropic noise of the same total
    magnitude. The public code z-normalized each histogram before averaging,
    which makes every score exactly 0.
    """
    return torch.linalg.vector_norm(hog_histograms(imgs, patch, bins), dim=-1)


def stage_weights(progress: float | Tensor, cfg: SelectiveMAEConfig, device: torch.device | None = None) -> Tensor:
    """Mix of the expansion stages at a training progress. -> (3,) float32 [near, far, random].

    progress in [0, 1] is the fraction of total steps done (float or 0-dim
    tensor; a tensor stays on its device, no host sync). `near` until
    `near_until`, `far` until `far_until`, then `random`; each switch is a
    linear blend over a window of width `blend` centred on the switch
    (`blend = 0`: hard switch). The weights sum to 1.
    """
    if isinstance(progress, Tensor):
        p = progress.to(device=device if device is not None else progress.device, dtype=torch.float32)
    else:
        # torch.full fills on the device: no host-to-device copy.
        p = torch.full((), float(progress), dtype=torch.float32, device=device)

    def ramp(edge: float) -> Tensor:
        if cfg.blend > 0.0:
            return ((p - (edge - cfg.blend / 2.0)) / cfg.blend).clamp(0.0, 1.0)
        return (p >= edge).float()

    to_far = ramp(cfg.near_until)
    to_random = ramp(cfg.far_until)
    # Validated windows do not overlap, so to_far >= to_random and all weights are >= 0.
    return torch.stack([1.0 - to_far, to_far - to_random, to_random])


def sample_stages(weights: Tensor, batch: int, generator: torch.Generator | None = None) -> Tensor:
    """Draw one stage per sample from weights (3,). -> (B,) int64 in {0 near, 1 far, 2 random}.

    Inverse-CDF with one uniform per sample: elementwise, no multinomial sync.
    """
    u = torch.rand(batch, device=weights.device, generator=generator)
    return (u >= weights[0]).long() + (u >= weights[0] + weights[1]).long()


def floor_count(num_patches: int, ratio: float) -> int:
    """floor(N * ratio), robust to float error (196 * 0.15 = 29.4 must not floor to 29 vs 28)."""
    return math.floor(num_patches * ratio + 1e-9)


def psts_counts(num_patches: int, cfg: SelectiveMAEConfig) -> tuple[int, int, int, int]:
    """(initial, first expansion, second expansion, targets) for N patches.

    visible V = floor(N(1-m)); initial = max(1, floor(N(1-m)/2)); the expansions
    split V - initial as ceil/floor halves; targets = floor(N r).
    """
    visible = floor_count(num_patches, 1.0 - cfg.mask_ratio)
    targets = floor_count(num_patches, cfg.decode_ratio)
    initial = min(visible, max(1, floor_count(num_patches, (1.0 - cfg.mask_ratio) / 2.0)))
    rest = visible - initial
    return initial, (rest + 1) // 2, rest // 2, targets


def pick_by_score(
    scores: Tensor,
    k: int,
    rule: str,
    temperature: float,
    exclude: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """k indices per row by `rule`, never from `exclude`. scores: (B, N); exclude: (B, N) bool.

    `topk`: the k highest scores, in decreasing order; `softmax`: sampled without
    replacement from softmax(z / temperature), z the score standardized per row (so
    the temperature does not depend on image contrast); `random`: uniform without
    replacement. -> (B, k) int64.
    """
    if rule == "topk":
        key = scores
    elif rule == "softmax":
        z = (scores - scores.mean(dim=1, keepdim=True)) / (scores.std(dim=1, keepdim=True) + 1e-6)
        key = gumbel_keys(z / temperature, generator)
    elif rule == "random":
        key = torch.rand(scores.shape, device=scores.device, generator=generator)
    else:
        raise ValueError(f"unknown selection rule {rule!r} (topk, softmax, random)")
    if exclude is not None:
        key = key.masked_fill(exclude, float("-inf"))
    return key.topk(k, dim=1).indices


def gumbel_keys(logits: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """logits + Gumbel noise: the top-k of the result samples k rows of softmax(logits) without replacement."""
    u = torch.rand(logits.shape, device=logits.device, generator=generator).clamp_(1e-20, 1.0)
    return logits - torch.log(-torch.log(u))


def set_similarity(sim: Tensor, selected: Tensor, reduce: str) -> Tensor:
    """Similarity of every patch to the selected SET. sim: (B, N, N) cosine; selected: (B, N) bool.

    reduce `max`: to its nearest selected patch; `min`: to its farthest; `mean`: the
    mean over the set. -> (B, N) fp32 (meaningless at selected rows; callers mask them).
    """
    member = selected.unsqueeze(1)  # (B, 1, N): column j is a selected patch
    if reduce == "max":
        return sim.masked_fill(~member, float("-inf")).amax(dim=-1)
    if reduce == "min":
        return sim.masked_fill(~member, float("inf")).amin(dim=-1)
    return (sim * member).sum(dim=-1) / selected.sum(dim=1, keepdim=True).clamp_min(1)


# How `near` and `far` measure the similarity to the selected set, per `similarity`
# option: (near reduce, far reduce). `near` takes the highest, `far` the lowest value.
SIMILARITY_RULES: dict[str, tuple[str, str]] = {
    "paper": ("max", "min"),  # Eq. 3-4: nearest selected patch for near, farthest for far
    "max": ("max", "max"),  # public code: max cosine for both (near = highest, far = lowest)
    "mean": ("mean", "mean"),  # mean cosine to the set (this project before issue 13)
}


def psts_select(
    scores: Tensor,
    patch_emb: Tensor,
    progress: float | Tensor,
    cfg: SelectiveMAEConfig,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """PSTS: choose visible and target patches for every sample at once.

    scores: (B, N) HOG scores; patch_emb: (B, N, D) the embeddings compared by cosine
    similarity (used detached; the caller adds positions for `with_pos`); progress in [0, 1].
    Returns visible_idx (B, V) int64 (initial set first, then the expansions),
    target_idx (B, T) int64 (by decreasing score for `topk`), stage (B,) int64
    (0 near, 1 far, 2 random). Visible and target sets are disjoint and free of
    repeats. Randomness from torch's RNG (or `generator`).
    """
    b, n = scores.shape
    device = scores.device
    initial, grow1, grow2, num_targets = psts_counts(n, cfg)
    scores = scores.float()
    stage = sample_stages(stage_weights(progress, cfg, device=device), b, generator)
    init_idx = pick_by_score(scores, initial, cfg.init_select, cfg.init_temperature, generator=generator)

    selected = torch.zeros(b, n, dtype=torch.bool, device=device).scatter_(1, init_idx, True)
    emb = F.normalize(patch_emb.detach().float(), dim=-1)
    # All pairwise cosines once per step (B, N, N); both sub-steps reduce it over their set.
    sim = torch.bmm(emb, emb.transpose(1, 2))
    random_key = torch.rand(b, n, device=device, generator=generator)
    near = (stage == STAGE_NEAR).unsqueeze(1)
    far = (stage == STAGE_FAR).unsqueeze(1)
    near_reduce, far_reduce = SIMILARITY_RULES[cfg.similarity]
    parts = [init_idx]
    for count in (grow1, grow2):  # the two expansion sub-steps (constant loop)
        if count == 0:
            continue
        near_key = set_similarity(sim, selected, near_reduce)
        far_key = near_key if far_reduce == near_reduce else set_similarity(sim, selected, far_reduce)
        key = torch.where(near, near_key, torch.where(far, -far_key, random_key))
        new_idx = key.masked_fill(selected, float("-inf")).topk(count, dim=1).indices
        selected.scatter_(1, new_idx, True)
        parts.append(new_idx)
    visible_idx = torch.cat(parts, dim=1)
    target_idx = pick_by_score(scores, num_targets, cfg.target_select, cfg.target_temperature, exclude=selected,
                               generator=generator)
    return visible_idx, target_idx, stage


def random_select(
    batch: int,
    num_patches: int,
    num_visible: int,
    num_targets: int,
    device: torch.device,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Uniform random masking (MAE, CrossMAE). -> visible_idx (B, V), target_idx (B, T).

    One random permutation per sample (argsort of uniform noise, as MAE): the
    first V are visible, the next T are targets (T = N - V reconstructs every
    masked patch, as MAE).
    """
    noise = torch.rand(batch, num_patches, device=device, generator=generator)
    order = noise.argsort(dim=1)
    return order[:, :num_visible], order[:, num_visible : num_visible + num_targets]
