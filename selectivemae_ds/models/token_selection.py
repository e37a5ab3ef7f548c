"""HOG patch scores and PSTS token selection, as pure batched tensor functions.

Everything here runs on the device of its inputs with static shapes: no Python
loop over samples, no `.item()`/`.cpu()`/`nonzero`, so a training step never
waits for the host. The only Python loops run over constants (9 orientation
bins, 2 expansion sub-steps).

PSTS (progressive semantic token selection), per image with N patches:
1. `hog_patch_scores`: each patch's HOG gradient energy.
2. Initial set of K0 = floor(N(1-m)/2) patches by score (top-k, or sampled
   without replacement from softmax(standardized score / T) by Gumbel top-k).
3. Expansion to V = floor(N(1-m)) patches in two sub-steps. Each sub-step
   ranks the remaining patches by their mean cosine similarity to the selected
   set (patch embeddings, detached) and, per sample, takes the most similar
   (stage `near`), the least similar (`far`) or random ones (`random`).
   The stage of every sample is drawn from `stage_weights(progress)`, so the
   blend windows mix stages across samples of one batch (the public code
   applied one sample's mask to the whole batch).
4. Targets: the T = floor(N r) highest-scoring non-visible patches.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import MaskingConfig

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


def stage_weights(progress: float | Tensor, cfg: MaskingConfig, device: torch.device | None = None) -> Tensor:
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


def gumbel_topk(logits: Tensor, k: int, generator: torch.Generator | None = None) -> Tensor:
    """Sample k indices per row without replacement from softmax(logits). (B, N) -> (B, k)."""
    u = torch.rand(logits.shape, device=logits.device, generator=generator).clamp_(1e-20, 1.0)
    return (logits - torch.log(-torch.log(u))).topk(k, dim=1).indices


def psts_counts(num_patches: int, cfg: MaskingConfig) -> tuple[int, int, int, int]:
    """(initial, first expansion, second expansion, targets) for N patches.

    initial = max(1, floor(N(1-m)/2)); the expansions split V - initial as
    ceil/floor halves; targets = floor(N r).
    """
    visible, targets = cfg.counts("selectivemae", num_patches)
    initial = min(visible, max(1, math.floor(num_patches * (1.0 - cfg.mask_ratio) / 2.0 + 1e-9)))
    rest = visible - initial
    return initial, (rest + 1) // 2, rest // 2, targets


def psts_select(
    scores: Tensor,
    patch_emb: Tensor,
    progress: float | Tensor,
    cfg: MaskingConfig,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """PSTS: choose visible and target patches for every sample at once.

    scores: (B, N) HOG scores; patch_emb: (B, N, D) patch embeddings (used
    detached, for cosine similarity); progress in [0, 1].
    Returns visible_idx (B, V) int64 (initial set first, then the expansions),
    target_idx (B, T) int64 (by decreasing score), stage (B,) int64
    (0 near, 1 far, 2 random). Visible and target sets are disjoint and free of
    repeats. Randomness from torch's RNG (or `generator`).
    """
    b, n = scores.shape
    device = scores.device
    initial, grow1, grow2, num_targets = psts_counts(n, cfg)
    scores = scores.float()
    stage = sample_stages(stage_weights(progress, cfg, device=device), b, generator)

    if cfg.init_select == "topk":
        init_idx = scores.topk(initial, dim=1).indices
    else:
        # Standardize per sample so the temperature does not depend on image contrast.
        z = (scores - scores.mean(dim=1, keepdim=True)) / (scores.std(dim=1, keepdim=True) + 1e-6)
        init_idx = gumbel_topk(z / cfg.temperature, initial, generator)

    selected = torch.zeros(b, n, dtype=torch.bool, device=device).scatter_(1, init_idx, True)
    emb = F.normalize(patch_emb.detach().float(), dim=-1)
    random_key = torch.rand(b, n, device=device, generator=generator)
    near = (stage == STAGE_NEAR).unsqueeze(1)
    far = (stage == STAGE_FAR).unsqueeze(1)
    parts = [init_idx]
    for count in (grow1, grow2):  # the two expansion sub-steps (constant loop)
        if count == 0:
            continue
        # Mean cosine similarity to the selected set = dot with the sum of its unit
        # vectors (up to the positive factor 1/|set|, which does not change the ranking).
        anchor = (emb * selected.unsqueeze(-1)).sum(dim=1)  # (B, D)
        sim = torch.bmm(emb, anchor.unsqueeze(-1)).squeeze(-1)  # (B, N)
        key = torch.where(near, sim, torch.where(far, -sim, random_key))
        new_idx = key.masked_fill(selected, float("-inf")).topk(count, dim=1).indices
        selected.scatter_(1, new_idx, True)
        parts.append(new_idx)
    visible_idx = torch.cat(parts, dim=1)
    target_idx = scores.masked_fill(selected, float("-inf")).topk(num_targets, dim=1).indices
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
