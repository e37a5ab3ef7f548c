"""Pictures of what the model sees: input, HOG scores, visible patches, targets, reconstruction.

One function, :func:`picture_grid`, draws the grid; the trainer puts it into
TensorBoard every ``train.picture_every`` steps and ``smae-visualize`` writes it as
a picture (PNG, or any format Pillow writes, from ``--out``'s extension) for a checkpoint
and some images:

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
import io
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from selectivemae_ds.atomic import atomic_write_bytes, check_writable_dir
from selectivemae_ds.data.pipeline import IMAGENET_MEAN, IMAGENET_STD
from selectivemae_ds.errors import ConfigError, DataError, run_cli

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


def image_format(path: str | Path) -> str:
    """The Pillow format that writes ``path`` (from its extension) as an 8-bit RGB image.

    ConfigError naming the path when the extension is missing, unknown to Pillow, or names
    a format that cannot hold an RGB picture: checked before any compute.
    """
    suffix = Path(path).suffix.lower()
    Image.init()
    fmt = Image.registered_extensions().get(suffix)
    if not suffix or fmt is None or fmt not in Image.SAVE:
        raise ConfigError(f"--out {path}: {'no' if not suffix else 'unknown'} image extension "
                          f"{suffix!r}; use e.g. .png or .jpg")
    try:
        Image.new("RGB", (1, 1)).save(io.BytesIO(), format=fmt)
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(f"--out {path}: Pillow's {fmt} writer cannot store an RGB picture ({e})") from e
    return fmt


def save_image(grid: Tensor, path: str | Path) -> None:
    """(3, H, W) in [0, 1] -> 8-bit image at ``path`` (format from the extension), replaced atomically."""
    arr = (grid.permute(1, 2, 0).numpy() * 255.0 + 0.5).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=image_format(path))
    atomic_write_bytes(path, buf.getvalue())


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="smae-visualize", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", help="run directory (newest complete checkpoint) or a checkpoint tag directory")
    ap.add_argument("images", nargs="+", help="image files (center square crop, resized to the model's size)")
    ap.add_argument("--out", required=True,
                    help="picture to write; the extension picks the format (.png, .jpg, .webp, ...); replaced "
                         "if it exists")
    ap.add_argument("--progress", type=float, default=None,
                    help="training progress in [0, 1] that sets the PSTS stage (default: the checkpoint's)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the token selection's randomness")
    return ap


def _main(argv: list[str] | None) -> int:
    from selectivemae_ds import checkpoint
    from selectivemae_ds.evaluate import load_images
    from selectivemae_ds.export import load_fp32_state, resolve_tag
    from selectivemae_ds.config import load_resolved
    from selectivemae_ds.models import build_model

    args = build_parser().parse_args(argv)
    # Everything a user can get wrong on the command line is refused before the checkpoint is read.
    out = Path(args.out)
    if out.is_dir():
        raise ConfigError(f"--out {out}: is a directory; give the picture file to write, e.g. {out / 'grid.png'}")
    image_format(out)
    check_writable_dir(out.parent, "--out")
    if args.progress is not None and not 0.0 <= args.progress <= 1.0:
        raise ConfigError(f"--progress must be in [0, 1], got {args.progress}")
    missing = [p for p in args.images if not Path(p).is_file()]
    if missing:
        raise DataError(f"no such image(s): {', '.join(missing)}")

    tag = resolve_tag(args.src)
    client = checkpoint.read_client_state(tag)
    config = load_resolved(client["config"])
    model = build_model(config.model, config.method_cfg)
    model.load_state_dict(load_fp32_state(tag), strict=True)
    progress = args.progress
    if progress is None:
        progress = client["step"] / max(config.train.steps, 1)
    imgs = load_images([Path(p) for p in args.images], model.model_cfg.img_size, center_crop=True)
    torch.manual_seed(args.seed)
    with torch.no_grad():
        details = model.eval().forward_details(imgs, float(progress))
    save_image(picture_grid(imgs, details, model.patch_size, max_images=len(args.images)), out)
    print(f"smae-visualize: {out} ({len(args.images)} image(s) x columns {' | '.join(COLUMNS)}; "
          f"checkpoint {tag}, progress {progress:.2f})")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Console entry point; exit codes from :mod:`selectivemae_ds.errors`."""
    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
