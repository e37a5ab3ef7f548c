"""Sharded DeepSpeed checkpoints: save on every rank, completeness marker, keep-last-k, resume.

Layout under ``run_dir/checkpoints``::

    step_00000400/                 one tag = one checkpoint
      mp_rank_00_model_states.pt   DeepSpeed (module + client state)
      *_optim_states.pt            DeepSpeed ZeRO shards, one per rank
      client_state.json            step, samples_seen, loader state, resolved config, world size
      rank_state/                  per-rank files besides DeepSpeed's (InfoBatch score-table slices)
      COMPLETE                     written last, by rank 0, after every rank has finished
    step_00000400_universal/       optional: ds_to_universal output (for a new world size)

A tag without ``COMPLETE`` (a crash mid-write) is never loaded, and DeepSpeed's own
``latest`` file is not trusted: auto-resume scans for the newest complete tag that passes
:func:`validate_tag` (its files, and :func:`check_pickles`: DeepSpeed unpickles with
``weights_only=False``, so every file it could open is checked first). The
checkpoint directory must be on a filesystem every node sees (rank 0 writes the
marker after a barrier, which is only meaningful when it sees the other ranks' files).

Universal conversion (changing the number of ranks)::

    python -m selectivemae_ds.checkpoint to-universal RUN_DIR/checkpoints/step_00000400

validates the tag, runs ``python -m deepspeed.checkpoint.ds_to_universal`` and copies the client state,
giving ``step_00000400_universal`` (complete); resume from it with
``--resume RUN_DIR/checkpoints/step_00000400_universal``.
"""
from __future__ import annotations

import argparse
import errno
import json
import os
import re
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from pickle import UnpicklingError  # the exception class only: nothing here unpickles
from typing import Any, Iterator

import torch
import torch.distributed as dist
from deepspeed.checkpoint.constants import (
    UNIVERSAL_CHECKPOINT_INFO,
    UNIVERSAL_CHECKPOINT_VERSION_KEY,
    UNIVERSAL_CHECKPOINT_VERSION_VALUE,
)

from selectivemae_ds.atomic import atomic_write_bytes, atomic_write_text
from selectivemae_ds.config import fixed_on_resume
from selectivemae_ds.errors import CheckpointError, ConfigError, run_cli

COMPLETE = "COMPLETE"
CLIENT_STATE = "client_state.json"
# Per-rank state files beside DeepSpeed's (save(rank_files=...)); to_universal copies the folder.
RANK_STATE_DIR = "rank_state"
UNIVERSAL_SUFFIX = "_universal"
TAG_RE = re.compile(r"^step_(\d{8})(_universal)?$")
# The only non-tensor classes DeepSpeed's checkpoints reference (beyond what torch's
# weights_only unpickler allows): plain data holders, safe to construct.
ALLOWED_GLOBALS = frozenset({
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
})
# A failed write leaving less than this free on the checkpoint filesystem is reported as a full disk.
FULL_DISK_BYTES = 1 << 20


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint file could run code when DeepSpeed unpickles it: a Python global outside the
    allowlist, pickle opcodes the static check cannot read, a file that is not a torch zip
    checkpoint, or a link or special file inside the tag."""


class DamagedCheckpointError(CheckpointError):
    """A checkpoint tag is incomplete, misses a file it needs, or holds an unreadable one."""


class CheckpointWriteError(CheckpointError):
    """Writing a checkpoint failed for lack of space (ENOSPC/EDQUOT); earlier tags are untouched."""


# Resolved-config keys that must match to resume: the fields marked {"resume": "fixed"} in
# the config dataclasses (parameter shapes, sample stream, meaning of a step). Everything
# else (logging, lr, paths, run length) may change.
COMPAT_KEYS = fixed_on_resume()


def tag_for(step: int) -> str:
    """The tag name of the checkpoint written after ``step`` optimizer steps."""
    return f"step_{step:08d}"


def is_complete(path: str | os.PathLike[str]) -> bool:
    """A tag directory whose write finished: its COMPLETE marker (written last) exists.

    Complete is not yet loadable: :func:`validate_tag` checks the files a load needs.
    """
    return (Path(path) / COMPLETE).is_file()


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
    """The JSON client state of a complete tag.

    :class:`DamagedCheckpointError` naming the tag or the file when the tag does not exist,
    is incomplete, or its ``client_state.json`` is missing, unreadable or lacks ``step``,
    ``world_size`` or ``config``.
    """
    tag = Path(tag_dir)
    if not tag.is_dir():
        raise DamagedCheckpointError(f"{tag}: no such checkpoint directory")
    if not is_complete(tag):
        raise DamagedCheckpointError(f"{tag} is incomplete (no {COMPLETE} marker); its write was interrupted")
    path = tag / CLIENT_STATE
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise DamagedCheckpointError(f"{path}: missing (the tag has {COMPLETE} but no client state)") from e
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DamagedCheckpointError(f"{path}: unreadable client state ({e})") from e
    if not isinstance(state, dict):
        raise DamagedCheckpointError(f"{path}: unreadable client state (a JSON {type(state).__name__}, not an object)")
    missing = [k for k in ("step", "world_size", "config") if k not in state]
    if missing:
        raise DamagedCheckpointError(f"{path}: unreadable client state (no {', '.join(missing)})")
    if not isinstance(state["world_size"], int) or state["world_size"] < 1:
        raise DamagedCheckpointError(f"{path}: unreadable client state (world_size {state['world_size']!r})")
    return state


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
    """ConfigError naming the first key in COMPAT_KEYS whose value differs from the checkpoint's."""
    saved, current = _flat(saved_config), _flat(current_config)
    for key in COMPAT_KEYS:
        if saved.get(key) != current.get(key):
            raise ConfigError(
                f"{key}: the checkpoint {tag} was trained with {saved.get(key)!r}, this config has "
                f"{current.get(key)!r}; resume with the same value or start a new run_dir"
            )


@dataclass
class ResumeTarget:
    """What to load: the tag directory, its client state, whether it is a universal checkpoint,
    and the newer complete tags ``--resume auto`` passed over, each with what was wrong."""

    tag_dir: Path
    client_state: dict[str, Any]
    universal: bool
    skipped: list[str] = field(default_factory=list)


def is_universal(tag_dir: Path) -> bool:
    """A ds_to_universal output (``zero/<param>/*.pt``), loadable by any number of ranks.

    A ``zero`` that is a link does not count (:func:`check_pickles` refuses it)."""
    zero = tag_dir / "zero"
    return tag_dir.name.endswith(UNIVERSAL_SUFFIX) or (zero.is_dir() and not zero.is_symlink())


def _missing_files(tag: Path, world_size: int) -> list[str]:
    """The files a load of ``tag`` needs that are absent, from the world size that saved it.

    A sharded tag holds the module (``mp_rank_00_model_states.pt``, or one
    ``zero_pp_rank_R_mp_rank_00_model_states.pt`` per rank under ZeRO-3) and one optimizer
    shard ``[bf16_]zero_pp_rank_R_mp_rank_00_optim_states.pt`` per rank; a universal tag
    holds the module file and ``zero/<param>/fp32.pt`` files.
    """
    names = {p.name for p in tag.iterdir()}
    missing: list[str] = []
    if "mp_rank_00_model_states.pt" not in names:
        per_rank = [f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in range(world_size)]
        if is_universal(tag) or not any(n in names for n in per_rank):
            missing.append("mp_rank_00_model_states.pt")
        else:
            missing += [n for n in per_rank if n not in names]
    if is_universal(tag):
        zero = tag / "zero"
        if not zero.is_dir() or not any((d / "fp32.pt").is_file() for d in zero.iterdir()):
            missing.append("zero/<param>/fp32.pt")
        return missing
    for r in range(world_size):
        shard = f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt"
        if not any(n.endswith(shard) for n in names):
            missing.append(f"*{shard} (rank {r}'s optimizer states)")
    return missing


def validate_tag(tag_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Check a tag before anything unpickles it; return its client state.

    The tag must be complete with a readable client state, hold every file a load needs
    for the world size that saved it, and pass :func:`check_pickles`. Raises
    :class:`DamagedCheckpointError` or :class:`UnsafeCheckpointError` naming the file.
    """
    tag = Path(tag_dir)
    state = read_client_state(tag)
    missing = _missing_files(tag, state["world_size"])
    if missing:
        raise DamagedCheckpointError(
            f"{tag}: missing {', '.join(missing)} (saved by {state['world_size']} ranks); the tag cannot be loaded"
        )
    check_pickles(tag)
    return state


def resolve_resume(resume: str, ckpt_dir: Path, current_config: dict[str, Any], world_size: int) -> ResumeTarget | None:
    """Turn ``checkpoint.resume`` into a validated ResumeTarget (None = fresh start) before any work.

    A fresh start is refused (:class:`ConfigError`) where ``ckpt_dir`` already holds complete
    checkpoints. ``auto`` takes the newest complete tag that passes :func:`validate_tag`,
    recording in ``skipped`` why each newer one was passed over; when none passes it raises
    :class:`DamagedCheckpointError` listing them all (never a silent fresh start). A named
    tag that fails the validation raises its error.

    A sharded checkpoint saved with another number of ranks cannot be loaded directly;
    the :class:`CheckpointError` says how to convert it to a universal one.
    """
    if resume == "":
        existing = newest_complete(ckpt_dir)
        if existing is not None:
            # A fresh start here would overwrite and prune the other run's checkpoints.
            raise ConfigError(
                f"checkpoint.resume: {ckpt_dir} already holds checkpoints (newest {existing.name}); "
                "continue them with --resume auto, or choose a new run_dir"
            )
        return None
    skipped: list[str] = []
    if resume == "auto":
        candidates = list_complete(ckpt_dir)[::-1]
        if not candidates:
            return None
        for tag in candidates:
            try:
                state = validate_tag(tag)
                break
            except CheckpointError as e:
                skipped.append(str(e))
        else:
            raise DamagedCheckpointError(
                f"checkpoint.resume auto: none of the {len(candidates)} complete checkpoints under {ckpt_dir} "
                "can be loaded: " + "; ".join(skipped)
            )
    else:
        tag = Path(resume)
        state = validate_tag(tag)
    check_compatible(state["config"], current_config, tag)
    universal = is_universal(tag)
    if not universal and state["world_size"] != world_size:
        raise CheckpointError(
            f"checkpoint.resume: {tag} was saved by {state['world_size']} ranks and this run has {world_size}; "
            f"convert it first: python -m selectivemae_ds.checkpoint to-universal {tag} "
            f"and resume from {tag}{UNIVERSAL_SUFFIX}"
        )
    return ResumeTarget(tag_dir=tag, client_state=state, universal=universal, skipped=skipped)


def warn_skipped(target: ResumeTarget) -> None:
    """Print on stderr, one line each, why ``--resume auto`` passed over newer complete tags (call on one rank)."""
    for why in target.skipped:
        print(f"[resume] warning: passed over a damaged checkpoint: {why}", file=sys.stderr, flush=True)


def check_steps(target: ResumeTarget, steps: int) -> None:
    """:class:`ConfigError` when the resolved ``train.steps`` is below the checkpoint's step."""
    done = int(target.client_state["step"])
    if steps < done:
        raise ConfigError(
            f"train.steps: {steps} is below the step of the checkpoint {target.tag_dir} ({done}); "
            f"resume with train.steps >= {done}, or start a new run_dir"
        )


def _free_bytes(path: Path) -> int:
    """Bytes an unprivileged writer may still use on the filesystem holding ``path``."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


@contextmanager
def _write_guard(tag_dir: Path, step: int) -> Iterator[None]:
    """Report a checkpoint write that failed on a full filesystem as :class:`CheckpointWriteError`.

    torch's zip writer reports a full disk as ``RuntimeError: [enforce fail at
    inline_container.cc:...] unexpected pos`` without the errno, so besides an ``OSError``
    carrying ENOSPC/EDQUOT a failure is attributed to space only when the filesystem is
    then (nearly) full. Any other failure propagates unchanged.
    """
    try:
        yield
    except (OSError, RuntimeError) as e:
        code = e.errno if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT) else None
        free = _free_bytes(tag_dir.parent)
        if code is None and free < FULL_DISK_BYTES:
            code = errno.ENOSPC
        if code is None:
            raise
        raise CheckpointWriteError(
            f"checkpoint {tag_dir}: {os.strerror(code)} ({errno.errorcode[code]}) while writing step {step}; "
            f"{free} bytes free on the filesystem of {tag_dir.parent}. The tag has no {COMPLETE} marker and is "
            "never loaded; the earlier complete checkpoints are untouched. Free space (or lower checkpoint.keep), "
            f"then continue with --resume auto. ({type(e).__name__}: {e})"
        ) from e


def save(engine: Any, ckpt_dir: Path, step: int, client_state: dict[str, Any], keep: int,
         rank_files: dict[str, bytes] | None = None, delay_s: float = 0.0) -> Path:
    """Save a sharded checkpoint on every rank; rank 0 marks it complete after all ranks finished, then prunes.

    Must be called by every rank (DeepSpeed gathers and writes collectively). ``rank_files``
    ({file name in RANK_STATE_DIR: bytes}, names unique per rank) is this rank's own state
    besides DeepSpeed's, e.g. its slice of the InfoBatch score table; it is written before
    the COMPLETE marker and copied by :func:`to_universal`.
    A full disk raises :class:`CheckpointWriteError` naming ENOSPC and the directory, before any
    ``COMPLETE`` marker or pruning.
    ``delay_s`` (``debug.checkpoint_delay_s``, tests only) holds every rank between its shard
    write and the marker.
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
    with _write_guard(tag_dir, step):
        engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=ds_client_state)
        if rank == 0:
            atomic_write_text(tag_dir / CLIENT_STATE, json.dumps(client_state, indent=1))
        for name, data in (rank_files or {}).items():
            (tag_dir / RANK_STATE_DIR).mkdir(exist_ok=True)
            atomic_write_bytes(tag_dir / RANK_STATE_DIR / name, data)
    if delay_s > 0:
        time.sleep(delay_s)
    # Every rank's shard is on disk before the marker exists.
    dist.barrier()
    if rank == 0:
        with _write_guard(tag_dir, step):
            atomic_write_text(tag_dir / COMPLETE, f"{step}\n")
        prune(ckpt_dir, keep, upto=tag)
    dist.barrier()
    return tag_dir


def prune(ckpt_dir: Path, keep: int, upto: str | None = None) -> list[Path]:
    """Delete all but the newest ``keep`` complete tags, and incomplete tags older than the newest complete one.

    With ``upto`` (the tag just saved) only tags up to it count: newer ones are left over from
    before a resume from an earlier tag (e.g. a damaged newest tag ``--resume auto`` passed
    over); they are neither counted nor deleted, and the save of their step replaces them.
    """
    complete = [p for p in list_complete(ckpt_dir) if upto is None or p.name <= upto]
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


def _tag_files(tag_dir: Path) -> list[Path]:
    """Every regular file under ``tag_dir``, walked without following links.

    A symbolic link or special file anywhere inside is refused: DeepSpeed follows links
    (``zero/`` of a universal tag, any ``*.pt``), so the files it would open must be the ones
    checked, and a FIFO would block the check.
    """
    files: list[Path] = []
    pending = [tag_dir]
    while pending:
        folder = pending.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError as e:
            raise DamagedCheckpointError(f"{folder}: unreadable checkpoint directory ({e.strerror})") from e
        for entry in entries:
            path = Path(entry.path)
            if entry.is_symlink():
                raise UnsafeCheckpointError(
                    f"{path}: a symbolic link inside the checkpoint (to {os.readlink(path)}); refusing to load it "
                    "(DeepSpeed would follow it to files outside the check); copy the real files instead"
                )
            if entry.is_dir(follow_symlinks=False):
                pending.append(path)
            elif entry.is_file(follow_symlinks=False):
                files.append(path)
            else:
                raise UnsafeCheckpointError(f"{path}: not a regular file or directory; refusing to load it")
    return sorted(files)


def _check_torch_file(path: Path) -> None:
    """Refuse one ``*.pt`` file unless it is a torch zip checkpoint whose pickle (protocol 2, as
    torch.save writes) references only torch's safe globals and :data:`ALLOWED_GLOBALS`."""
    if path.stat().st_size == 0:
        raise DamagedCheckpointError(f"{path}: empty file (its write was cut short); refusing to load it")
    try:
        unsafe = set(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except ValueError as e:
        raise UnsafeCheckpointError(
            f"{path}: not a torch zip checkpoint ({e}); refusing to load it (a raw or legacy pickle cannot be "
            "checked, and DeepSpeed would unpickle it with weights_only=False)"
        ) from e
    except (UnpicklingError, EOFError) as e:
        raise UnsafeCheckpointError(
            f"{path}: its pickle holds opcodes outside what torch.save writes ({type(e).__name__}: {e}; "
            "e.g. pickle protocol 4 or 5); refusing to load it (they cannot be checked without running them)"
        ) from e
    except RuntimeError as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DamagedCheckpointError(f"{path}: damaged torch zip checkpoint ({first}); refusing to load it") from e
    except OSError as e:
        raise DamagedCheckpointError(f"{path}: unreadable ({e.strerror})") from e
    extra = sorted(unsafe - ALLOWED_GLOBALS)
    if extra:
        raise UnsafeCheckpointError(
            f"{path}: references Python globals outside the allowlist {extra}; refusing to load it "
            "(loading would execute them)"
        )


def check_pickles(tag_dir: Path) -> int:
    """Check every file DeepSpeed may unpickle from a tag before anything opens it; return how many.

    The one safety check of every entry point that loads a tag (resume, rollback, export,
    visualize, to-universal). DeepSpeed 0.19.8 loads checkpoints with
    ``torch.load(weights_only=False)`` (TorchCheckpointEngine, zero_to_fp32, ds_to_universal,
    the universal loader reading ``zero/<param>/*.pt``), which runs any code a crafted pickle
    asks for. The tag is walked without following links (:func:`_tag_files` refuses them);
    the globals of every ``*.pt`` file are read from its pickle opcodes without unpickling
    (``torch.serialization.get_unsafe_globals_in_checkpoint``), and a file that is not a torch
    zip checkpoint, or whose opcodes that scan cannot read, is refused too
    (:class:`UnsafeCheckpointError`; a truncated file: :class:`DamagedCheckpointError`).
    """
    files = [f for f in _tag_files(Path(tag_dir)) if f.name.endswith(".pt")]
    for f in files:
        _check_torch_file(f)
    return len(files)


def load(engine: Any, target: ResumeTarget) -> None:
    """Check the tag's pickles, then load module, optimizer and DeepSpeed counters from ``target`` on every rank."""
    check_pickles(target.tag_dir)
    path, _ = engine.load_checkpoint(str(target.tag_dir.parent), tag=target.tag_dir.name,
                                     load_optimizer_states=True, load_lr_scheduler_states=False)
    if path is None:
        raise DamagedCheckpointError(f"DeepSpeed could not load the checkpoint {target.tag_dir} (its log above says why)")


def to_universal(tag_dir: Path, out_dir: Path | None = None, workers: int = 1) -> Path:
    """Convert a complete sharded tag to DeepSpeed's universal format (loadable by any world size).

    The tag is validated (:func:`validate_tag`, which runs :func:`check_pickles`) before
    ds_to_universal, which unpickles with ``weights_only=False``, opens any file of it.
    """
    tag_dir = Path(tag_dir)
    if is_universal(tag_dir):
        raise ConfigError(f"{tag_dir} is already a universal checkpoint; resume from it with --resume {tag_dir}")
    state = validate_tag(tag_dir)
    out = Path(out_dir) if out_dir is not None else tag_dir.with_name(tag_dir.name + UNIVERSAL_SUFFIX)
    if out.exists():
        if not out.is_dir() or (any(out.iterdir()) and not (out / "zero").is_dir()):
            raise ConfigError(f"--out: {out} exists and is not an earlier universal conversion; choose another path")
        shutil.rmtree(out)
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(tag_dir),
           "--output_folder", str(out), "--num_extract_workers", str(workers), "--num_merge_workers", str(workers)]
    done = subprocess.run(cmd, check=False)
    if done.returncode != 0:
        raise CheckpointError(f"ds_to_universal exited {done.returncode} converting {tag_dir}; its output above "
                              f"says why ({out} is left incomplete, without {COMPLETE})")
    if (tag_dir / RANK_STATE_DIR).is_dir():
        shutil.copytree(tag_dir / RANK_STATE_DIR, out / RANK_STATE_DIR)
    atomic_write_text(out / CLIENT_STATE, json.dumps(state, indent=1))
    atomic_write_text(out / COMPLETE, f"{state['step']}\n")
    return out


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    """``python -m selectivemae_ds.checkpoint to-universal TAG_DIR [--out DIR] [--workers N]``."""
    parser = argparse.ArgumentParser(prog="python -m selectivemae_ds.checkpoint",
                                     description="Checkpoint tools of selectivemae_ds.")
    sub = parser.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    conv = sub.add_parser("to-universal", help="convert a sharded checkpoint for another number of ranks",
                          description="Check a complete sharded tag (files, pickles), convert it with DeepSpeed's "
                                      "ds_to_universal and mark the result complete.")
    conv.add_argument("tag_dir", type=Path, help="a complete sharded tag, e.g. RUN_DIR/checkpoints/step_00000400")
    conv.add_argument("--out", type=Path, default=None,
                      help="output directory (default: TAG_DIR_universal beside the tag); an earlier conversion "
                           "there is replaced, any other existing path is refused")
    conv.add_argument("--workers", type=_positive_int, default=1,
                      help="processes ds_to_universal uses to extract and to merge the shards (default 1)")
    args = parser.parse_args(argv)
    out = to_universal(args.tag_dir, args.out, args.workers)
    print(f"universal checkpoint: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
