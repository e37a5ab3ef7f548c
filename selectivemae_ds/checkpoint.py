"""Sharded DeepSpeed checkpoints: save on every rank, completeness marker, keep-last-k, resume.

Layout under ``run_dir/checkpoints``::

    step_00000400/                 one tag = one checkpoint
      mp_rank_00_model_states.pt   DeepSpeed (module + client state)
      *_optim_states.pt            DeepSpeed ZeRO shards, one per rank
      client_state.json            step, samples_seen, loader state, resolved config, world size
      COMPLETE                     written last, by rank 0, after every rank has finished
    step_00000400_universal/       optional: ds_to_universal output (for a new world size)

A tag without ``COMPLETE`` (a crash mid-write) is never loaded, and DeepSpeed's own
``latest`` file is not trusted: auto-resume scans for the newest complete tag. The
checkpoint directory must be on a filesystem every node sees (rank 0 writes the
marker after a barrier, which is only meaningful when it sees the other ranks' files).

Universal conversion (changing the number of ranks)::

    python -m selectivemae_ds.checkpoint to-universal RUN_DIR/checkpoints/step_00000400

runs ``python -m deepspeed.checkpoint.ds_to_universal`` and copies the client state,
giving ``step_00000400_universal`` (complete); resume from it with
``--resume RUN_DIR/checkpoints/step_00000400_universal``.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from deepspeed.checkpoint.constants import (
    UNIVERSAL_CHECKPOINT_INFO,
    UNIVERSAL_CHECKPOINT_VERSION_KEY,
    UNIVERSAL_CHECKPOINT_VERSION_VALUE,
)

COMPLETE = "COMPLETE"
CLIENT_STATE = "client_state.json"
UNIVERSAL_SUFFIX = "_universal"
TAG_RE = re.compile(r"^step_(\d{8})(_universal)?$")
# Test-only fault hook: seconds every rank sleeps after its shards are written and before
# the COMPLETE marker, so a reliability test can kill a rank inside the write window.
# Unset (the default) in any real run.
DELAY_ENV = "SMAE_TEST_CHECKPOINT_DELAY_S"
# The only non-tensor classes DeepSpeed's checkpoints reference (beyond what torch's
# weights_only unpickler allows): plain data holders, safe to construct.
ALLOWED_GLOBALS = frozenset({
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
})


class UnsafeCheckpointError(ValueError):
    """A checkpoint file references a Python global outside the allowlist (it could run code when loaded)."""

# Resolved-config keys that must match to resume: they fix the parameter shapes, the
# data order or the meaning of a step. Everything else (logging, lr, paths) may change.
COMPAT_KEYS = (
    "model.method", "model.size", "model.img_size", "model.patch_size", "model.decoder_depth",
    "model.decoder_dim", "model.decoder_heads", "model.decoder_self_attn", "crossmae.weight_fm", "crossmae.use_input",
    "data.img_size", "train.global_batch", "train.seed",
)


def tag_for(step: int) -> str:
    """The tag name of the checkpoint written after ``step`` optimizer steps."""
    return f"step_{step:08d}"


def is_complete(path: str | os.PathLike[str]) -> bool:
    """A tag directory is loadable only when its COMPLETE marker and client state exist."""
    p = Path(path)
    return (p / COMPLETE).is_file() and (p / CLIENT_STATE).is_file()


def list_complete(ckpt_dir: str | os.PathLike[str]) -> list[Path]:
    """Complete sharded (non-universal) tags, oldest first."""
    root = Path(ckpt_dir)
    if not root.is_dir():
        return []
    tags = [p for p in root.iterdir() if p.is_dir() and (m := TAG_RE.match(p.name)) and not m.group(2)]
    return sorted((p for p in tags if is_complete(p)), key=lambda p: p.name)


def newest_complete(ckpt_dir: str | os.PathLike[str]) -> Path | None:
    """The newest complete tag, or None."""
    tags = list_complete(ckpt_dir)
    return tags[-1] if tags else None


def read_client_state(tag_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The JSON client state of a complete tag; ValueError when the tag is incomplete."""
    tag = Path(tag_dir)
    if not is_complete(tag):
        raise ValueError(f"checkpoint.resume: {tag} is incomplete (no {COMPLETE} marker); its write was interrupted")
    return json.loads((tag / CLIENT_STATE).read_text(encoding="utf-8"))


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dict -> {"a.b": v}."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_compatible(saved_config: dict[str, Any], current_config: dict[str, Any], tag: str | Path) -> None:
    """ValueError naming the first key in COMPAT_KEYS whose value differs from the checkpoint's."""
    saved, current = _flat(saved_config), _flat(current_config)
    for key in COMPAT_KEYS:
        if saved.get(key) != current.get(key):
            raise ValueError(
                f"{key}: the checkpoint {tag} was trained with {saved.get(key)!r}, this config has "
                f"{current.get(key)!r}; resume with the same value or start a new run_dir"
            )


@dataclass
class ResumeTarget:
    """What to load: the tag directory, its client state, and whether it is a universal checkpoint."""

    tag_dir: Path
    client_state: dict[str, Any]
    universal: bool


def resolve_resume(resume: str, ckpt_dir: Path, current_config: dict[str, Any], world_size: int) -> ResumeTarget | None:
    """Turn ``checkpoint.resume`` into a ResumeTarget (None = fresh start), checking it before any work.

    A fresh start is refused where ``ckpt_dir`` already holds complete checkpoints.

    A sharded checkpoint saved with another number of ranks cannot be loaded directly;
    the message says how to convert it to a universal one.
    """
    if resume == "":
        existing = newest_complete(ckpt_dir)
        if existing is not None:
            # A fresh start here would overwrite and prune the other run's checkpoints.
            raise ValueError(
                f"checkpoint.resume: {ckpt_dir} already holds checkpoints (newest {existing.name}); "
                "continue them with --resume auto, or choose a new run_dir"
            )
        return None
    if resume == "auto":
        tag = newest_complete(ckpt_dir)
        if tag is None:
            return None
    else:
        tag = Path(resume)
    state = read_client_state(tag)
    check_compatible(state["config"], current_config, tag)
    universal = tag.name.endswith(UNIVERSAL_SUFFIX) or (tag / "zero").is_dir()
    if not universal and int(state["world_size"]) != world_size:
        raise ValueError(
            f"checkpoint.resume: {tag} was saved by {state['world_size']} ranks and this run has {world_size}; "
            f"convert it first: python -m selectivemae_ds.checkpoint to-universal {tag} "
            f"and resume from {tag}{UNIVERSAL_SUFFIX}"
        )
    return ResumeTarget(tag_dir=tag, client_state=state, universal=universal)


def _atomic_write(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file, fsync and rename (readers never see half a file)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save(engine: Any, ckpt_dir: Path, step: int, client_state: dict[str, Any], keep: int) -> Path:
    """Save a sharded checkpoint on every rank; rank 0 marks it complete after all ranks finished, then prunes.

    Must be called by every rank (DeepSpeed gathers and writes collectively).
    """
    tag = tag_for(step)
    tag_dir = ckpt_dir / tag
    rank = dist.get_rank()
    if rank == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        if tag_dir.exists():
            # A leftover of an interrupted write of the same step (a rollback re-reaches it).
            shutil.rmtree(tag_dir)
    dist.barrier()
    # universal_checkpoint_info declares the checkpoint convertible by ds_to_universal; the
    # model is pure data parallel (no tensor/pipeline slicing), so the version key is all it needs.
    ds_client_state = {"smae": client_state,
                       UNIVERSAL_CHECKPOINT_INFO: {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}}
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=ds_client_state)
    if rank == 0:
        _atomic_write(tag_dir / CLIENT_STATE, json.dumps(client_state, indent=1))
    delay = float(os.environ.get(DELAY_ENV, "0"))
    if delay > 0:
        time.sleep(delay)
    # Every rank's shard is on disk before the marker exists.
    dist.barrier()
    if rank == 0:
        _atomic_write(tag_dir / COMPLETE, f"{step}\n")
        prune(ckpt_dir, keep)
    dist.barrier()
    return tag_dir


def prune(ckpt_dir: Path, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` complete tags, and incomplete tags older than the newest complete one."""
    complete = list_complete(ckpt_dir)
    removed = complete[:-keep] if len(complete) > keep else []
    if complete:
        newest = complete[-1].name
        for p in ckpt_dir.iterdir():
            m = TAG_RE.match(p.name)
            if p.is_dir() and m and not m.group(2) and not is_complete(p) and p.name < newest:
                removed.append(p)
    for p in removed:
        shutil.rmtree(p)
    return removed


def check_pickles(tag_dir: Path) -> int:
    """Refuse a tag whose ``*.pt`` files reference globals beyond torch's safe set and
    :data:`ALLOWED_GLOBALS`; return the number of files checked.

    DeepSpeed 0.19.8 loads checkpoints with ``torch.load(weights_only=False)`` (its
    TorchCheckpointEngine), which would run any code a crafted pickle asks for. The
    global names are read from the pickle opcodes without unpickling anything
    (``torch.serialization.get_unsafe_globals_in_checkpoint``), so a malicious file is
    refused before DeepSpeed opens it.
    """
    files = sorted(tag_dir.rglob("*.pt"))
    for f in files:
        try:
            unsafe = set(torch.serialization.get_unsafe_globals_in_checkpoint(str(f)))
        except (RuntimeError, ValueError, OSError) as e:
            raise UnsafeCheckpointError(f"{f}: not a readable torch checkpoint ({type(e).__name__}: {e})") from e
        extra = sorted(unsafe - ALLOWED_GLOBALS)
        if extra:
            raise UnsafeCheckpointError(
                f"{f}: references Python globals outside the allowlist {extra}; refusing to load it "
                "(loading would execute them)"
            )
    return len(files)


def load(engine: Any, target: ResumeTarget) -> None:
    """Check the tag's pickles, then load module, optimizer and DeepSpeed counters from ``target`` on every rank."""
    check_pickles(target.tag_dir)
    path, _ = engine.load_checkpoint(str(target.tag_dir.parent), tag=target.tag_dir.name,
                                     load_optimizer_states=True, load_lr_scheduler_states=False)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint {target.tag_dir}")


def to_universal(tag_dir: Path, out_dir: Path | None = None, workers: int = 1) -> Path:
    """Convert a complete sharded tag to DeepSpeed's universal format (loadable by any world size)."""
    state = read_client_state(tag_dir)
    out = out_dir or tag_dir.with_name(tag_dir.name + UNIVERSAL_SUFFIX)
    if out.exists():
        shutil.rmtree(out)
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(tag_dir),
           "--output_folder", str(out), "--num_extract_workers", str(workers), "--num_merge_workers", str(workers)]
    subprocess.run(cmd, check=True)
    _atomic_write(out / CLIENT_STATE, json.dumps(state, indent=1))
    _atomic_write(out / COMPLETE, f"{state['step']}\n")
    return out


def main(argv: list[str] | None = None) -> None:
    """``python -m selectivemae_ds.checkpoint to-universal TAG_DIR [--out DIR]``."""
    parser = argparse.ArgumentParser(prog="python -m selectivemae_ds.checkpoint")
    sub = parser.add_subparsers(dest="cmd", required=True)
    conv = sub.add_parser("to-universal", help="convert a sharded checkpoint for another number of ranks")
    conv.add_argument("tag_dir", type=Path)
    conv.add_argument("--out", type=Path, default=None)
    conv.add_argument("--workers", type=int, default=1)
    args = parser.parse_args(argv)
    out = to_universal(args.tag_dir, args.out, args.workers)
    print(f"universal checkpoint: {out}")


if __name__ == "__main__":
    main()
