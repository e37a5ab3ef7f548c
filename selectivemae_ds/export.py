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
A JSON beside the weights (same name, ``.json``) records method, size, image size,
the timm architecture, steps and the resolved config; ``smae-eval`` reads it.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from selectivemae_ds import checkpoint
from selectivemae_ds.models import ModelConfig, build_model, configs_from_dict, timm_model_name


def resolve_tag(src: str | os.PathLike[str]) -> Path:
    """A complete checkpoint tag from a run directory or a tag directory."""
    path = Path(src)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such run or checkpoint directory")
    if (path / checkpoint.CLIENT_STATE).is_file() or checkpoint.TAG_RE.match(path.name):
        if not checkpoint.is_complete(path):
            raise ValueError(f"{path}: checkpoint is incomplete (no {checkpoint.COMPLETE} marker); "
                             "its write was interrupted, export an earlier one")
        return path
    tag = checkpoint.newest_complete(path / "checkpoints")
    if tag is None:
        raise ValueError(f"{path}: no complete checkpoint under {path / 'checkpoints'}")
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
    if (tag / "zero").is_dir():
        return _load_universal(tag)
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    # zero_to_fp32 unpickles with weights_only=False: refuse files that reference unknown globals first.
    checkpoint.check_pickles(tag)
    return dict(get_fp32_state_dict_from_zero_checkpoint(str(tag.parent), tag=tag.name))


def _configs(client_state: dict[str, Any]) -> tuple[ModelConfig, Any]:
    config = client_state.get("config")
    if not isinstance(config, dict) or "model" not in config:
        raise ValueError("checkpoint has no resolved config in its client state")
    return configs_from_dict(config)


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
        raise ValueError(f"encoder does not match timm's {name}: missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]}, wrong shapes {wrong[:5]}")


def export(src: str | os.PathLike[str], out: str | os.PathLike[str]) -> dict[str, Any]:
    """Write the encoder of ``src`` to ``out`` (+ ``.json``); return the JSON's content."""
    from safetensors.torch import save_file

    tag = resolve_tag(src)
    client = checkpoint.read_client_state(tag)
    model_cfg, method_cfg = _configs(client)
    model = build_model(model_cfg, method_cfg)
    full = load_fp32_state(tag)
    model.load_state_dict(full, strict=True)
    encoder = {k: v.detach().float().contiguous() for k, v in model.encoder.state_dict().items()}
    name = timm_model_name(model_cfg)
    check_against_timm(encoder, name, model_cfg.img_size)

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Write to a temp name and rename: a crash never leaves a truncated file under `out`.
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    os.close(fd)
    try:
        save_file(encoder, tmp, metadata={"format": "pt", "timm_model": name})
        os.replace(tmp, out)
    finally:
        Path(tmp).unlink(missing_ok=True)
    meta = {
        "timm_model": name,
        "img_size": model_cfg.img_size,
        "method": model_cfg.method,
        "size": model_cfg.size,
        "steps": client.get("step"),
        "samples_seen": client.get("samples_seen"),
        "checkpoint": str(tag),
        "sha256": hashlib.sha256(out.read_bytes()).hexdigest(),
        "load_with": f"timm.create_model({name!r}, num_classes=0, img_size={model_cfg.img_size}) "
                     "then load_state_dict(safetensors.torch.load_file(path), strict=True)",
        "config": client.get("config"),
    }
    out.with_suffix(".json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    return meta


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="smae-export", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", help="run directory (newest complete checkpoint) or a checkpoint tag directory")
    ap.add_argument("--out", required=True, help="output .safetensors (a .json with the same stem is written beside)")
    args = ap.parse_args(argv)
    try:
        meta = export(args.src, args.out)
    except (ValueError, FileNotFoundError) as e:
        print(f"smae-export: error: {e}", file=sys.stderr)
        return 2
    print(f"smae-export: {args.out} ({meta['timm_model']}, img_size {meta['img_size']}, {meta['method']} "
          f"after {meta['steps']} steps) from {meta['checkpoint']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
