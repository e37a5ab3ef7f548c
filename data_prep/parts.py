"""Multi-node packing: which share of the inputs part ``i`` of ``n`` packs, and where.

``smae-pack SRC... --out DIR --part i/n`` (``i`` 0-based, as ``SLURM_ARRAY_TASK_ID`` of
``--array=0-(n-1)`` or a Kubernetes indexed job's ``JOB_COMPLETION_INDEX``) lists every
input in the single-node order, keeps the contiguous share
``inputs[N*i//n : N*(i+1)//n]`` and packs it into ``DIR/part-0000i-of-0000n/``: a pack
output of its own (lock, work directory, shards, ``manifest.json`` written last), so
each part resumes like a single-node run. Parts may run at the same time on different
machines writing to one shared file system, or into separate ``DIR``\\ s whose part
directories are copied together before ``smae-pack merge DIR`` (:mod:`data_prep.merge`).

Every part records the same *plan* fingerprint (sources, the whole input listing, every
option that shapes the output, and ``n``); the merge refuses parts whose plans differ.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from data_prep.work import WORK_DIR_NAME, fingerprint_of
from selectivemae_ds.data.shards import MANIFEST_NAME, read_manifest
from selectivemae_ds.errors import ConfigError

MAX_PARTS = 99999
PART_DIR = re.compile(r"part-(\d{5})-of-(\d{5})")
MERGE_TOOL = "smae-pack merge"
_SPEC = re.compile(r"\s*(\d+)\s*/\s*(\d+)\s*")


def parse_part(text: str) -> tuple[int, int]:
    """``"i/n"`` -> ``(i, n)``; :class:`ConfigError` unless ``0 <= i < n <= MAX_PARTS``."""
    m = _SPEC.fullmatch(text)
    if m is None:
        raise ConfigError(f"--part {text!r}: expected I/N, e.g. --part 0/4 (I is 0-based, like "
                          "SLURM_ARRAY_TASK_ID of --array=0-3 or JOB_COMPLETION_INDEX)")
    part = int(m.group(1)), int(m.group(2))
    check_part(part, text)
    return part


def check_part(part: tuple[int, int], text: str | None = None) -> None:
    """:class:`ConfigError` unless ``part`` is ``(i, n)`` with ``0 <= i < n <= MAX_PARTS``."""
    i, n = part
    shown = text if text is not None else f"{i}/{n}"
    if not 1 <= n <= MAX_PARTS:
        raise ConfigError(f"--part {shown}: N must be 1..{MAX_PARTS}, got {n}")
    if not 0 <= i < n:
        raise ConfigError(f"--part {shown}: I must be 0..{n - 1} (0-based, like SLURM_ARRAY_TASK_ID of "
                          f"--array=0-{n - 1} or JOB_COMPLETION_INDEX), got {i}")


def part_dir_name(i: int, n: int) -> str:
    return f"part-{i:05d}-of-{n:05d}"


def part_dir(root: Path, i: int, n: int) -> Path:
    return Path(root) / part_dir_name(i, n)


def share_bounds(total: int, i: int, n: int) -> tuple[int, int]:
    """``[lo, hi)``: the positions, in the single-node input order, that part ``i`` of ``n``
    packs. Contiguous, disjoint, covering ``0..total``; sizes differ by at most one."""
    return total * i // n, total * (i + 1) // n


def part_params(description: dict[str, Any], part: tuple[int, int], bounds: tuple[int, int]) -> dict[str, Any]:
    """The ``part`` entry of a part's manifest params: its index, share and the plan
    fingerprint every part of one pack shares (the description minus the part's own batch
    size, plus ``n``)."""
    plan = {k: v for k, v in description.items() if k != "batch_size"}
    plan["parts"] = part[1]
    return {"index": part[0], "of": part[1], "first_input": bounds[0], "end_input": bounds[1],
            "plan": fingerprint_of(plan)}


def check_part_root(root: Path) -> None:
    """Refuse to put parts next to a single-node pack (finished or not) in ``root``."""
    if (root / WORK_DIR_NAME).is_dir():
        raise ConfigError(f"--out {root} holds an unfinished single-node pack; parts (--part) need a "
                          "directory of their own")
    if (root / MANIFEST_NAME).is_file() and read_manifest(root).get("params", {}).get("tool") != MERGE_TOOL:
        raise ConfigError(f"--out {root} holds a single-node dataset; parts (--part) need a directory "
                          "of their own")


def part_dirs(root: Path) -> list[str]:
    """Names of the part directories in ``root``, sorted."""
    return sorted(p.name for p in root.iterdir() if PART_DIR.fullmatch(p.name) and p.is_dir())


def refuse_parts_in(root: Path) -> None:
    """A single-node pack must not write into a directory holding parts of a multi-node one."""
    found = part_dirs(root)
    if found:
        raise ConfigError(f"--out {root} holds parts of a multi-node pack ({', '.join(found[:3])}"
                          f"{', ...' if len(found) > 3 else ''}); merge them with 'smae-pack merge {root}', or "
                          "use another --out")
