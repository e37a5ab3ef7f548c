"""scripts/build_wheelhouse.py --site pieces and scripts/install_wheelhouse.sh on site bundles
(no network: a made-up tree stands in for the installed wheels)."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("build_wheelhouse", REPO / "scripts" / "build_wheelhouse.py")
wh = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(wh)


def _touch(root: Path, rel: str, data: bytes = b"x") -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def test_prune_site_keeps_what_the_target_interpreter_loads(tmp_path: Path) -> None:
    site = tmp_path / "site"
    keep = ["nvidia/dali/backend_impl.cpython-312-x86_64-linux-gnu.so", "nvidia/dali/libdali.so",
            "nvidia/dali/__init__.py", "deepspeed/ops/csrc/adam.h", "numcodecs/blosc.cpython-312-x86_64-linux-gnu.so"]
    drop = ["nvidia/dali/backend_impl.cpython-311-x86_64-linux-gnu.so",
            "nvidia/dali/backend_impl.cpython-313t-x86_64-linux-gnu.so", "nvidia/nvimgcodec/include/nvimgcodec.h",
            "nvidia/dali/include/dali/core.h", "nvidia/cu13/lib/libnvjpeg_static.a"]
    for rel in keep + drop:
        _touch(site, rel, b"12345")
    assert wh.prune_site(site, "3.12") == (len(drop), 5 * len(drop))
    left = sorted(p.relative_to(site).as_posix() for p in site.rglob("*") if p.is_file())
    assert left == sorted(keep)  # DeepSpeed's headers stay: it compiles its ops from them


def _bundle(tmp_path: Path) -> tuple[Path, Path]:
    site = tmp_path / "out" / "site"
    _touch(site, "pkg/__init__.py", b"VALUE = 3\n")
    _touch(site, "pkg/blob.bin", os.urandom(3 * 2**20 // 2))  # incompressible: the tar needs 2 parts of 1 MiB
    tar_xz = wh.pack_site(site, tmp_path / "out", 0)
    parts = wh.split(tar_xz, tmp_path / "staged", 1)
    assert [p.name for p in parts] == ["site.tar.xz.part-00", "site.tar.xz.part-01"]
    return site, tmp_path / "staged"


def _install(staged: Path, target: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(REPO / "scripts" / "install_wheelhouse.sh"), str(staged), "--target",
                           str(target)], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHON=sys.executable))


def test_site_bundle_round_trip(tmp_path: Path) -> None:
    site, staged = _bundle(tmp_path)
    r = _install(staged, tmp_path / "target")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "target" / "pkg" / "__init__.py").read_text() == "VALUE = 3\n"
    assert (tmp_path / "target" / "pkg" / "blob.bin").read_bytes() == (site / "pkg" / "blob.bin").read_bytes()


def test_a_missing_or_damaged_part_stops_the_install(tmp_path: Path) -> None:
    _site, staged = _bundle(tmp_path)
    (staged / "site.tar.xz.part-01").unlink()
    r = _install(staged, tmp_path / "target")
    assert r.returncode == 1 and "missing or damaged (copy it again)" in r.stderr
    assert not (tmp_path / "target").exists()
