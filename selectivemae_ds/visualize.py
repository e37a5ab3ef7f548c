"""Pictures of what the model sees: input, HOG scores, visible patches, targets, reconstruction.

One function, :func:`picture_grid`, draws the grid; the trainer puts it into
TensorBoard every ``train.picture_every`` steps and ``smae-visualize`` writes it as
a PNG for a checkpoint and some images:

    smae-visualize RUN_DIR_OR_CHECKPOINT IMAGE [IMAGE ...] --out grid.png [--progress 0.2]

Columns, one row per image: the input; the HOG score of every patch (white = high,
the score PSTS ranks patches by); the visible patches (others gray); the
reconstruction targets; the reconstruction (visible patches plus the decoder's
predictions pasted into the target positions, un-normalized per patch); then one
column per ``panel_<name>`` entry a method adds to its details (a whole-image
prediction, e.g. a second branch's).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from selectivemae_ds.data.pipeline import IMAGENET_MEAN, IMAGENET_STD

COLUMNS = ("input", "hog", "visible", "targets", "reconstruction")


def _paste(base: Tensor, idx: Tensor, src: Tensor) -> Tensor:
    """Copy of base (B, N, D) with rows idx (B, K) replaced by src (B, K, D)."""
    out = base.clone()
    out.scatter_(1, idx.unsqueeze(-1).expand(-1, -1, base.shape[-1]), src)
    return out


def picture_grid(imgs: Tensor, details: dict[str, Tensor], patch: int, max_images: int = 4) -> Tensor:
    """The grid as one (3, rows*S, (5 + E)*S) float image in [0, 1], on the CPU.

    imgs: (B, 3, S, S) ImageNet-normalized; details: ``PretrainModel.forward_details``
    (``hog`` (B, N), ``visible_idx`` (B, V), ``target_idx`` (B, T), ``pred_pixels``
    (B, T, p*p*3) in the input's normalized space, and E optional ``panel_<name>``
    (B, N, p*p*3) whole-image predictions in the same space, drawn in key order).
    """
    from selectivemae_ds.models import gather_tokens, patchify, unpatchify

    imgs = imgs[:max_images].float()
    b, _, s, _ = imgs.shape
    g = s // patch
    mean = torch.tensor(IMAGENET_MEAN, device=imgs.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=imgs.device).view(1, 3, 1, 1)

    def rgb(x: Tensor) -> Tensor:
        return (x * std + mean).clamp(0.0, 1.0)

    x = patchify(rgb(imgs), patch)  # (B, N, p*p*3) in [0, 1]
    blank = torch.full_like(x, 0.5)
    vis = details["visible_idx"][:b].long()
    tgt = details["target_idx"][:b].long()
    pred = patchify(rgb(unpatchify(_paste(patchify(imgs, patch), tgt, details["pred_pixels"][:b].float()),
                                   patch, g, g)), patch)
    visible = _paste(blank, vis, gather_tokens(x, vis))
    targets = _paste(blank, tgt, gather_tokens(x, tgt))
    recon = _paste(visible, tgt, gather_tokens(pred, tgt))

    hog = details["hog"][:b].float()
    lo, hi = hog.min(dim=1, keepdim=True).values, hog.max(dim=1, keepdim=True).values
    hog = (hog - lo) / (hi - lo).clamp_min(1e-12)  # per image: the ranking is what PSTS uses
    hog_map = hog.view(b, 1, g, g).repeat_interleave(patch, 2).repeat_interleave(patch, 3).expand(b, 3, s, s)

    extra = [details[k][:b].float() for k in sorted(details) if k.startswith("panel_")]
    panels = [rgb(imgs), hog_map] + [unpatchify(p, patch, g, g) for p in (visible, targets, recon)]
    panels += [rgb(unpatchify(p, patch, g, g)) for p in extra]
    rows = torch.cat(panels, dim=3)  # (B, 3, S, (5 + E) S)
    # HOST SYNC: pictures only (every picture_every steps, or the CLI).
    return torch.cat(list(rows), dim=1).cpu()


def save_png(grid: Tensor, path: str | Path) -> None:
    """(3, H, W) in [0, 1] -> 8-bit PNG."""
    arr = (grid.permute(1, 2, 0).numpy() * 255.0 + 0.5).astype(np.uint8)
    Image.fromarray(arr).save(path)


def main(argv: list[str] | None = None) -> int:
    from selectivemae_ds import checkpoint
    from selectivemae_ds.evaluate import load_images
    from selectivemae_ds.export import load_fp32_state, resolve_tag
    from selectivemae_ds.models import build_model, configs_from_dict

    ap = argparse.ArgumentParser(prog="smae-visualize", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", help="run directory (newest complete checkpoint) or a checkpoint tag directory")
    ap.add_argument("images", nargs="+", help="image files (center square crop, resized to the model's size)")
    ap.add_argument("--out", required=True, help="output PNG")
    ap.add_argument("--progress", type=float, default=None,
                    help="training progress in [0, 1] that sets the PSTS stage (default: the checkpoint's)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the token selection's randomness")
    args = ap.parse_args(argv)
    try:
        tag = resolve_tag(args.src)
        client = checkpoint.read_client_state(tag)
        config = client["config"]
        model = build_model(*configs_from_dict(config))
        model.load_state_dict(load_fp32_state(tag), strict=True)
        missing = [p for p in args.images if not Path(p).is_file()]
        if missing:
            raise FileNotFoundError(f"no such image(s): {', '.join(missing)}")
        progress = args.progress
        if progress is None:
            progress = client["step"] / max(int(config["train"]["steps"]), 1)
        if not 0.0 <= progress <= 1.0:
            raise ValueError(f"--progress must be in [0, 1], got {progress}")
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"smae-visualize: error: {e}", file=sys.stderr)
        return 2
    imgs = load_images([Path(p) for p in args.images], model.model_cfg.img_size, center_crop=True)
    torch.manual_seed(args.seed)
    with torch.no_grad():
        details = model.eval().forward_details(imgs, float(progress))
    save_png(picture_grid(imgs, details, model.patch_size, max_images=len(args.images)), args.out)
    print(f"smae-visualize: {args.out} ({len(args.images)} image(s) x columns {' | '.join(COLUMNS)}; "
          f"checkpoint {tag}, progress {progress:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
