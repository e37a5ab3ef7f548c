"""smae-export: the pretrained encoder of a DeepSpeed checkpoint as timm weights.

    smae-export RUN_DIR_OR_CHECKPOINT --out encoder.safetensors

RUN_DIR picks its newest complete checkpoint; a tag directory
(``RUN_DIR/checkpoints/step_NNNNNNNN`` or a ``..._universal`` one) is used as given,
and only when complete. The fp32 master weights are gathered from the ZeRO shards of
any stage and any number of ranks (DeepSpeed's zero_to_fp32), or read from a
universal checkpoint, loaded strictly into the model the checkpoint's resolved config
describes, and the encoder's state dict (timm key names by construction) is written
as safetensors. The architecture is checked against timm's before anything is
written, so ``timm.create_model(NAME, num_classes=0, img_size=S)`` loads it strictly.
A JSON beside the weights (the output's name with its suffix replaced by ``.json``,
so ``--out`` itself must not end in ``.json``) records method, size, image size, the
timm architecture, steps, the weights' sha256 and the resolved config; ``smae-eval``
reads it. Both files are replaced atomically with the usual permissions (0644 under
umask 022); existing files are kept unless ``--force``.

Exit codes are the project's (``selectivemae_ds.errors``): 2 for a wrong flag or
output path, 4 for a checkpoint that is missing, incomplete or unusable.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

from selectivemae_ds import checkpoint
from selectivemae_ds.atomic import atomic_write_bytes, atomic_write_text, check_writable_dir
from selectivemae_ds.errors import CheckpointError, ConfigError, run_cli
from selectivemae_ds.config import load_resolved
from selectivemae_ds.models import ModelConfig, build_model, timm_model_name


def resolve_tag(src: str | os.PathLike[str]) -> Path:
    """A complete checkpoint tag from a run directory or a tag directory."""
    path = Path(src)
    if not path.is_dir():
        raise ConfigError(f"{path}: no such run or checkpoint directory")
    if (path / checkpoint.CLIENT_STATE).is_file() or checkpoint.TAG_RE.match(path.name):
        if not checkpoint.is_complete(path):
            raise CheckpointError(f"{path}: checkpoint is incomplete (no {checkpoint.COMPLETE} marker); "
                                  "its write was interrupted, use an earlier one")
        return path
    tag = checkpoint.newest_complete(path / "checkpoints")
    if tag is None:
        raise CheckpointError(f"{path}: no complete checkpoint under {path / 'checkpoints'}")
    return tag


def _load_universal(tag: Path) -> dict[str, torch.Tensor]:
    """fp32 parameters of a universal checkpoint (``zero/<name>/fp32.pt``) plus the buffers
    kept in its model-states file."""
    state: dict[str, torch.Tensor] = {}
    for param_dir in sorted(p for p in (tag / "zero").iterdir() if (p / "fp32.pt").is_file()):
        blob = torch.load(param_dir / "fp32.pt", map_location="cpu", weights_only=True)
        state[param_dir.name] = blob["param"] if isinstance(blob, dict) else blob
    model_states = sorted(tag.glob("mp_rank_*_model_states.pt"))
    if model_states:
        module = torch.load(model_states[0], map_location="cpu", weights_only=True)["module"]
        for key, value in module.items():
            state.setdefault(key, value.float() if value.is_floating_point() else value)
    return state


def load_fp32_state(tag: Path) -> dict[str, torch.Tensor]:
    """The full fp32 state dict of a checkpoint tag, whatever the ZeRO stage and rank count."""
    # zero_to_fp32 unpickles with weights_only=False: the one check of every tag loader comes first.
    checkpoint.check_pickles(tag)
    if (tag / "zero").is_dir():
        return _load_universal(tag)
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return dict(get_fp32_state_dict_from_zero_checkpoint(str(tag.parent), tag=tag.name))


def _configs(client_state: dict[str, Any]) -> tuple[ModelConfig, Any]:
    """(model config, method config) of a checkpoint, through the one resolved-config reader."""
    cfg = load_resolved(client_state.get("config"))
    return cfg.model, cfg.method_cfg


def check_against_timm(encoder_state: dict[str, torch.Tensor], name: str, img_size: int) -> None:
    """Raise when the keys or shapes differ from timm's architecture (built on the meta device:
    no memory, even for ViT-H)."""
    import timm

    with torch.device("meta"):
        reference = timm.create_model(name, pretrained=False, num_classes=0, img_size=img_size).state_dict()
    missing = sorted(set(reference) - set(encoder_state))
    unexpected = sorted(set(encoder_state) - set(reference))
    wrong = sorted(k for k in set(reference) & set(encoder_state)
                   if tuple(reference[k].shape) != tuple(encoder_state[k].shape))
    if missing or unexpected or wrong:
        raise CheckpointError(f"encoder does not match timm's {name}: missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]}, wrong shapes {wrong[:5]}")


def sidecar_path(out: str | os.PathLike[str]) -> Path:
    """The metadata JSON written beside exported weights (``smae-eval`` reads the same name)."""
    return Path(out).with_suffix(".json")


def check_outputs(out: str | os.PathLike[str], force: bool = False) -> tuple[Path, Path]:
    """(weights, sidecar) paths for ``--out``, refused before any loading when they cannot be written.

    ConfigError when ``out`` is a directory, ends in ``.json`` (its sidecar would be the
    weights file itself), lies in a directory that cannot be written, or when either file
    exists and ``force`` is false.
    """
    out = Path(out)
    sidecar = sidecar_path(out)
    if out.is_dir():
        raise ConfigError(f"--out {out}: is a directory; give the weights file to write, "
                          f"e.g. {out / 'encoder.safetensors'}")
    if out.suffix.lower() == ".json":
        raise ConfigError(f"--out {out}: ends in .json, the name of the metadata file written beside the weights "
                          f"({sidecar}); use e.g. {out.with_suffix('.safetensors')}")
    if sidecar.is_dir():
        raise ConfigError(f"--out {out}: its metadata file {sidecar} is a directory")
    check_writable_dir(out.parent, "--out")
    if not force:
        existing = [str(p) for p in (out, sidecar) if p.exists()]
        if existing:
            raise ConfigError(f"--out {out}: {' and '.join(existing)} already exist(s); pass --force to replace")
    return out, sidecar


def export(src: str | os.PathLike[str], out: str | os.PathLike[str], force: bool = False) -> dict[str, Any]:
    """Write the encoder of ``src`` to ``out`` (+ its ``.json`` sidecar); return the JSON's content.

    The output paths are checked (:func:`check_outputs`) before the checkpoint is read.
    """
    from safetensors.torch import save

    out, sidecar = check_outputs(out, force)
    tag = resolve_tag(src)
    client = checkpoint.read_client_state(tag)
    model_cfg, method_cfg = _configs(client)
    model = build_model(model_cfg, method_cfg)
    full = load_fp32_state(tag)
    model.load_state_dict(full, strict=True)
    encoder = {k: v.detach().float().contiguous() for k, v in model.encoder.state_dict().items()}
    name = timm_model_name(model_cfg)
    check_against_timm(encoder, name, model_cfg.img_size)

    weights = save(encoder, metadata={"format": "pt", "timm_model": name})
    # Weights first, sidecar last: a crash in between leaves a sidecar whose sha256 does not match.
    atomic_write_bytes(out, weights)
    meta = {
        "timm_model": name,
        "img_size": model_cfg.img_size,
        "method": model_cfg.method,
        "size": model_cfg.size,
        "steps": client.get("step"),
        "samples_seen": client.get("samples_seen"),
        "checkpoint": str(tag),
        "sha256": hashlib.sha256(weights).hexdigest(),
        "load_with": f"timm.create_model({name!r}, num_classes=0, img_size={model_cfg.img_size}) "
                     "then load_state_dict(safetensors.torch.load_file(path), strict=True)",
        "config": client.get("config"),
    }
    atomic_write_text(sidecar, json.dumps(meta, indent=1) + "\n")
    return meta


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="smae-export", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", help="run directory (newest complete checkpoint) or a checkpoint tag directory")
    ap.add_argument("--out", required=True,
                    help="weights file to write, e.g. encoder.safetensors; the metadata goes to the same name "
                         "with the suffix .json (so --out must not end in .json)")
    ap.add_argument("--force", action="store_true",
                    help="replace the weights and metadata files when they already exist (default: refuse)")
    return ap


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    meta = export(args.src, args.out, force=args.force)
    print(f"smae-export: {args.out} ({meta['timm_model']}, img_size {meta['img_size']}, {meta['method']} "
          f"after {meta['steps']} steps) from {meta['checkpoint']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Console entry point; exit codes from :mod:`selectivemae_ds.errors`."""
    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
