"""The pack output directory under contention and trouble, and smae-pack's exit codes.

- Two runs on one ``--out``: the second refuses at once naming the holder (exit 5), or
  waits with ``--wait-lock``; kill -9 of the holder frees the lock and the rerun resumes.
- A read-only ``--out`` is refused before any work (exit 2); a disk that fills up mid-run
  stops it with the path and ENOSPC named (exit 5), and after space is freed the same
  command resumes to a dataset that verifies. Both run in a user and mount namespace
  (``unshare -rm``) with a tmpfs mounted on ``--out``; skipped where namespaces are off.
- No input at all, or every input skipped: exit 3 and no manifest; ``verify`` of an empty
  dataset fails.
"""
from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data_prep.cli import main as cli_main
from data_prep.cli import pack_parser, verify_parser
from selectivemae_ds.data.shards import write_manifest
from tests.launch import REPO


def _inputs(assets_dir: Path, root: Path, copies: int) -> Path:
    """``copies`` copies of the bundled images: enough work to keep a pack busy a few seconds."""
    src = root / "src"
    for i in range(copies):
        shutil.copytree(assets_dir, src / f"c{i}")
    return src


def _cmd(src: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "data_prep.cli", str(src), "--out", str(out), "--workers", "1", "--quiet",
            *extra]


def _start_holder(src: Path, out: Path) -> subprocess.Popen[bytes]:
    """Start a pack in its own process group; return once it holds the lock on ``out``."""
    proc = subprocess.Popen(_cmd(src, out), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    deadline = time.monotonic() + 60
    while f'"pid": {proc.pid},' not in _read(out / ".lock"):
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        assert time.monotonic() < deadline, "the pack never took its lock"
        time.sleep(0.01)
    return proc


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        return ""


def test_second_pack_on_the_same_out_refuses_naming_the_holder_or_waits(
        tmp_path: Path, assets_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = _inputs(assets_dir, tmp_path, 4)
    out = tmp_path / "out"
    holder = _start_holder(src, out)
    try:
        assert cli_main([str(src), "--out", str(out), "--workers", "1", "--quiet"]) == 5
        err = capsys.readouterr().err
        assert err.startswith(f"run error: {out} is in use by another smae-pack --out (pid {holder.pid} on ")
        assert f"--out {out} --workers 1 --quiet); wait for it to finish" in err  # the holder's command
        assert holder.poll() is None, "the holder finished before the second run tried: the test proved nothing"
        # Waits for the holder's lock, then finds its finished dataset (it went ahead of it otherwise).
        assert cli_main([str(src), "--out", str(out), "--workers", "1", "--quiet", "--wait-lock", "300"]) == 0
        assert "already complete, nothing to do" in capsys.readouterr().out
        assert holder.wait(timeout=60) == 0
    finally:
        if holder.poll() is None:
            os.killpg(holder.pid, signal.SIGKILL)
        holder.wait(timeout=60)
    assert cli_main(["verify", str(out)]) == 0
    assert "OK, 13 records in 1 shard(s)" in capsys.readouterr().out


@pytest.mark.slow
def test_kill_9_of_the_holder_frees_the_lock_and_the_rerun_resumes(
        tmp_path: Path, assets_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = _inputs(assets_dir, tmp_path, 12)
    out = tmp_path / "out"
    holder = _start_holder(src, out)
    # Kill as soon as the first batch is committed: on an idle machine the whole pack takes
    # well under a second, so a fixed sleep can outlast it.
    deadline = time.monotonic() + 120
    while not any((out / ".smae-pack-work" / "batches").glob("*/b-*.json")):
        assert holder.poll() is None and time.monotonic() < deadline, "the pack committed no batch"
        time.sleep(0.005)
    os.killpg(holder.pid, signal.SIGKILL)
    holder.wait(timeout=60)
    assert (out / ".smae-pack-work").is_dir() and not (out / "manifest.json").exists()
    assert cli_main([str(src), "--out", str(out), "--workers", "1", "--quiet"]) == 0
    assert "resumed run" in capsys.readouterr().out
    assert cli_main(["verify", str(out)]) == 0


def _namespaces_work() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
                           capture_output=True, timeout=30)
    return probe.returncode == 0


needs_namespaces = pytest.mark.skipif(not _namespaces_work(),
                                      reason="needs unshare -rm (user + mount namespaces) to mount a tmpfs")


def _in_namespace(script: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(["unshare", "-rm", "sh", "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)


@needs_namespaces
def test_read_only_out_is_refused_before_any_work(tmp_path: Path, assets_dir: Path) -> None:
    out = tmp_path / "ro"
    out.mkdir()
    cmd = " ".join(shlex.quote(c) for c in _cmd(assets_dir, out))
    res = _in_namespace(f"mount -t tmpfs -o ro,size=1m tmpfs {shlex.quote(str(out))} && {cmd}")
    assert res.returncode == 2, res.stderr
    assert res.stderr == f"config error: --out: {out} is not writable\n"


@needs_namespaces
def test_disk_full_names_enospc_then_the_rerun_resumes(tmp_path: Path, assets_dir: Path) -> None:
    out = tmp_path / "small"
    out.mkdir()
    q = shlex.quote(str(out))
    cmd = " ".join(shlex.quote(c) for c in _cmd(assets_dir, out, "--images-per-shard", "4"))
    verify = " ".join(shlex.quote(c) for c in [sys.executable, "-m", "data_prep.cli", "verify", str(out)])
    res = _in_namespace(f"mount -t tmpfs -o size=1m tmpfs {q} && {{ {cmd}; echo rc1=$?; "
                        f"mount -o remount,size=64m tmpfs {q} && {cmd}; echo rc2=$?; {verify}; echo rc3=$?; }}")
    assert "rc1=5\n" in res.stdout, res.stdout + res.stderr
    err = res.stderr
    assert "run error: no space left on device (ENOSPC) writing " in err, err
    assert f"free space under {out} (or use another --out) and rerun the same command to resume" in err
    assert "Traceback" not in err
    assert "rc2=0\n" in res.stdout and "resumed run" in res.stdout, res.stdout + res.stderr
    assert "rc3=0\n" in res.stdout and "OK, 13 records in 4 shard(s)" in res.stdout


def test_no_inputs_and_all_inputs_skipped_exit_3_without_a_dataset(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "readme.txt").write_text("not an input")
    assert cli_main([str(src), "--out", str(tmp_path / "o1"), "--workers", "1", "--quiet"]) == 3
    err = capsys.readouterr().err
    assert err == (f"data error: no inputs: {src} hold no image or archive file (1 file(s) ignored by name); "
                   "nothing was packed\n")
    assert not (tmp_path / "o1" / "manifest.json").exists()
    (src / "notes.png").write_text("not an image either")
    assert cli_main([str(src), "--out", str(tmp_path / "o2"), "--workers", "1", "--quiet"]) == 3
    err = capsys.readouterr().err
    assert err.startswith("data error: no records: every one of the 1 input(s) was skipped (not_image=1)")
    assert not (tmp_path / "o2" / "manifest.json").exists()


def test_verify_fails_on_an_empty_or_missing_dataset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    write_manifest(empty, [], {}, {})
    assert cli_main(["verify", str(empty)]) == 3
    assert "the manifest lists no records" in capsys.readouterr().err
    assert cli_main(["verify", str(tmp_path / "nothing")]) == 3
    assert "no manifest.json" in capsys.readouterr().err


def test_bad_values_are_config_errors(tmp_path: Path, assets_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "o"
    assert cli_main([str(assets_dir), "--out", str(out), "--min-side", "600"]) == 2
    assert capsys.readouterr().err.startswith("config error: --min-side (600) must be at most half of --max-side")
    assert cli_main([str(tmp_path / "missing"), "--out", str(out)]) == 2
    assert capsys.readouterr().err == f"config error: input {str(tmp_path / 'missing')!r} does not exist\n"
    (tmp_path / "file").write_text("x")
    assert cli_main([str(assets_dir), "--out", str(tmp_path / "file")]) == 2
    assert capsys.readouterr().err == f"config error: --out: {tmp_path / 'file'} exists and is not a directory\n"
    with pytest.raises(SystemExit) as e:
        cli_main([str(assets_dir), "--out", str(out), "--wait-lock", "soon"])
    assert e.value.code == 2
    assert "--wait-lock: expected a number of seconds, got 'soon'" in capsys.readouterr().err


def test_every_flag_has_help() -> None:
    for parser in (pack_parser(), verify_parser()):
        for action in parser._actions:
            assert action.help and action.help.strip(), f"{parser.prog}: {action.option_strings or action.dest}"
