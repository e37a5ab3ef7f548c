"""A full disk while checkpointing: the run stops naming ENOSPC and the directory, the tag
being written never gets COMPLETE, and the earlier tags stay loadable.

The disk is real: ``run_dir/checkpoints`` is a tmpfs mounted by the test (needs root and
mount permission; the test skips saying why otherwise), sized to 1.5 times one checkpoint
of the demo model, so the step-2 save fits and the step-4 save fills it. A monkeypatched
writer would not show what torch's zip writer really reports (``[enforce fail at
inline_container.cc] unexpected pos``, without the errno), which is what the check must
recognize. One rank (``smae-pretrain``), the ZeRO-2 demo run of ``tests/launch.py``.
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from selectivemae_ds import checkpoint
from tests.launch import fp32_weights, pretrain


def _mount_tmpfs(path: Path, size: int) -> str | None:
    """Mount a tmpfs of ``size`` bytes at ``path``; None when mounted, else why not."""
    if os.geteuid() != 0:
        return "needs root to mount a tmpfs"
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "smae-disk-full", str(path)],
                       capture_output=True, text=True)
    return None if r.returncode == 0 else f"mount -t tmpfs is not permitted here: {r.stderr.strip()}"


@pytest.mark.slow
def test_disk_full_while_checkpointing_names_enospc_and_keeps_the_earlier_tag(tmp_path: Path, launch_dataset: Path,
                                                                              straight_run) -> None:
    one_tag = sum(f.stat().st_size for f in (straight_run("zero2.json") / "checkpoints" / "step_00000002").iterdir())
    run = tmp_path / "run"
    ckpts = run / "checkpoints"
    ckpts.mkdir(parents=True)
    why = _mount_tmpfs(ckpts, int(1.5 * one_tag))
    if why:
        pytest.skip(why)
    try:
        r = pretrain(run, launch_dataset, "zero2.json", ranks=1, check=False)
        step2, step4 = ckpts / "step_00000002", ckpts / "step_00000004"
        assert r.returncode != 0
        assert (f"checkpoint {step4}: No space left on device (ENOSPC) while writing step 4; ") in r.stderr, \
            r.stderr[-3000:]
        assert f"bytes free on the filesystem of {ckpts}. The tag has no COMPLETE marker" in r.stderr
        assert not checkpoint.is_complete(step4)
        assert checkpoint.list_complete(ckpts) == [step2]
        assert checkpoint.validate_tag(step2)["step"] == 2
        assert fp32_weights(step2)
    finally:
        subprocess.run(["umount", str(ckpts)], check=True)
