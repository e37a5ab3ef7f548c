#!/usr/bin/env python3
"""Build an offline wheel bundle of SelectiveMAE-DS for machines without network.

Air-gapped GPU clusters (and the lent benchmark machine) already have a CUDA
PyTorch but nothing else. This script collects, for a *target* Python version and
platform, the wheels of this project and of everything it needs that PyTorch does
not bring: DeepSpeed (an sdist on PyPI: built here into a pure-Python wheel),
NVIDIA DALI and its nvImageCodec/nvJPEG libraries, zarr, numcodecs, ...

The dependency closure is computed here, wheel by wheel, from each wheel's
``Requires-Dist`` evaluated for the target interpreter, skipping what the target's
PyTorch provides (torch and its own requirements, read from this environment's
installed torch). Versions are those installed in this environment when present, so
the bundle holds what CI tested.

Output: ``OUT/wheels/*.whl``, ``OUT/MANIFEST.tsv`` (name, version, file, sha256),
and with ``--split-mb`` the tarball cut into parts ``OUT/parts/wheelhouse.tar.part-NN``
(see ``scripts/install_wheelhouse.sh`` for the other side).

``--site`` makes the smallest bundle for one machine instead: the wheels installed here
into ``OUT/site`` for the target interpreter (pip ``--target``, no byte-compiling), less
what that interpreter never loads (extension modules built for other CPython versions,
C headers and static libraries of the ``nvidia`` packages), packed as ``OUT/site.tar.xz``
(xz -9: about 30% smaller than the wheels' zip deflate on DALI's libraries) and, with
``--split-mb``, cut into ``OUT/parts/site.tar.xz.part-NN``. Every part's sha256 is in
``OUT/parts/SHA256SUMS``. The other side unpacks it into a folder and puts that on
``PYTHONPATH``; nothing is installed there, so no pip runs on the target.

``--provided-file`` names the packages the target already has (one per line; for the
lent H200, ``bench/gpu_device_packages.txt``) and ``--skip`` leaves out packages that are
required on paper but never loaded by what will run (each one named in the report).
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.metadata as md
import re
import shutil
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

REPO = Path(__file__).resolve().parents[1]
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux_2_12_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"]
# Present beside any PyTorch install, or tied to its exact build (a torchvision
# from PyPI must match the target's torch), or only needed to build packages.
ALWAYS_PROVIDED = {"pip", "setuptools", "wheel", "numpy", "torchvision", "torchaudio"}
# An extension module's ABI tag, e.g. "cpython-312-x86_64-linux-gnu" or the free-threaded "cpython-313t-...".
EXT_ABI = re.compile(r"\.cpython-(\d+t?)-[^/]*\.so$")
# Build-time-only files of the nvidia packages (DALI, nvImageCodec, nvJPEG): never loaded at run time.
NVIDIA_BUILD_ONLY = re.compile(r"^nvidia/.*(/include/.*|\.a|\.h|\.hpp|\.cuh)$")


def target_env(python_version: str) -> dict[str, str]:
    env = default_environment()
    major_minor = ".".join(python_version.split(".")[:2])
    env.update(python_version=major_minor, python_full_version=f"{major_minor}.0",
               sys_platform="linux", platform_system="Linux", platform_machine="x86_64",
               os_name="posix", implementation_name="cpython", platform_python_implementation="CPython")
    return env


def installed_closure(root: str) -> set[str]:
    """Names of `root` and everything it requires, from this environment's metadata."""
    seen: set[str] = set()
    todo = [root]
    while todo:
        name = canonicalize_name(todo.pop())
        if name in seen:
            continue
        seen.add(name)
        try:
            reqs = md.requires(name) or []
        except md.PackageNotFoundError:
            continue
        for line in reqs:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return seen


def wheel_requires(path: Path, env: dict[str, str], extras: set[str]) -> list[Requirement]:
    """Requirements of a wheel for the target interpreter, with the given extras asked for."""
    with zipfile.ZipFile(path) as zf:
        meta_name = next(n for n in zf.namelist() if re.fullmatch(r"[^/]+\.dist-info/METADATA", n))
        text = zf.read(meta_name).decode("utf-8")
    out = []
    for line in text.splitlines():
        if line.startswith("Requires-Dist:"):
            req = Requirement(line.split(":", 1)[1].strip())
            if req.marker is None or any(req.marker.evaluate({**env, "extra": e}) for e in {"", *extras}):
                out.append(req)
    return out


def installed_version(name: str) -> str | None:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def pip_download(spec: str, dest: Path, python_version: str) -> Path:
    before = set(dest.glob("*.whl"))
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
           "--python-version", python_version, "--implementation", "cp", "-d", str(dest), spec]
    for plat in PLATFORMS:
        cmd += ["--platform", plat]
    subprocess.run(cmd, check=True)
    new = set(dest.glob("*.whl")) - before
    name = canonicalize_name(Requirement(spec).name)
    matches = [p for p in (new or dest.glob("*.whl")) if parse_wheel_filename(p.name)[0] == name]
    if len(matches) != 1:
        raise RuntimeError(f"pip download {spec}: expected one wheel of {name} in {dest}, found {matches}")
    return matches[0]


def build_local_wheel(target: str, dest: Path) -> Path:
    """Build a wheel (DeepSpeed's sdist, or this project) against this environment."""
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                        "-w", tmp, target], check=True)
        built = list(Path(tmp).glob("*.whl"))
        if len(built) != 1:
            raise RuntimeError(f"building {target} gave {built}")
        return Path(shutil.move(str(built[0]), dest / built[0].name))


def read_names(path: Path) -> set[str]:
    """Package names, one per line (blank lines and ``#`` comments ignored), canonicalized."""
    names = set()
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.add(canonicalize_name(line))
    return names


def install_site(wheels: list[Path], site: Path, python_version: str) -> None:
    """Install `wheels` into `site` as the target interpreter would load them (no deps, no .pyc)."""
    abi = "cp" + "".join(python_version.split(".")[:2])
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--no-compile",
           "--target", str(site), "--python-version", python_version, "--implementation", "cp", "--abi", abi,
           "--only-binary=:all:"]
    for plat in PLATFORMS:
        cmd += ["--platform", plat]
    subprocess.run(cmd + [str(w) for w in wheels], check=True)


def prune_site(site: Path, python_version: str) -> tuple[int, int]:
    """Delete what the target interpreter never loads; (files, bytes) removed."""
    keep_abi = "".join(python_version.split(".")[:2])
    files = size = 0
    for path in sorted(site.rglob("*")):
        if not path.is_file() or path.is_symlink():
            continue
        rel = path.relative_to(site).as_posix()
        abi = EXT_ABI.search(rel)
        if (abi and abi.group(1) != keep_abi) or NVIDIA_BUILD_ONLY.match(rel):
            files += 1
            size += path.stat().st_size
            path.unlink()
    return files, size


def pack_site(site: Path, out: Path, level: int) -> Path:
    """``site`` as one xz-compressed tar (all cores) with ``site/`` as its top folder."""
    tar_xz = out / "site.tar.xz"
    env = dict(os.environ, XZ_OPT=f"-{level} -T0")
    subprocess.run(["tar", "-C", str(site.parent), "-cJf", str(tar_xz), site.name], check=True, env=env)
    return tar_xz


def split(path: Path, parts: Path, limit_mib: int) -> list[Path]:
    """Cut `path` into ``parts/NAME.part-NN`` of at most `limit_mib` MiB, with their sha256 in SHA256SUMS."""
    parts.mkdir(parents=True, exist_ok=True)
    limit = limit_mib * 2**20
    written = []
    with open(path, "rb") as f:
        for k, block in enumerate(iter(lambda: f.read(limit), b"")):
            part = parts / f"{path.name}.part-{k:02d}"
            part.write_bytes(block)
            written.append(part)
    sums = "".join(f"{sha256(p)}  {p.name}\n" for p in written)
    (parts / "SHA256SUMS").write_text(sums, encoding="utf-8")
    return written


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO / ".wheelhouse", help="output folder (default: .wheelhouse)")
    ap.add_argument("--python-version", default="3.12", help="target interpreter version (default 3.12)")
    ap.add_argument("--provided", default="",
                    help="comma-separated extra package names the target already has (torch's closure, numpy, "
                         "torchvision and torchaudio are always skipped)")
    ap.add_argument("--provided-file", type=Path, default=None,
                    help="file of package names the target already has, one per line (# comments allowed), "
                         "e.g. bench/gpu_device_packages.txt for the lent H200")
    ap.add_argument("--skip", default="",
                    help="comma-separated packages to leave out although something requires them (libraries "
                         "the code that will run never loads); each one is listed in the report")
    ap.add_argument("--site", action="store_true",
                    help="pack the wheels installed for the target interpreter and pruned (OUT/site.tar.xz) "
                         "instead of the wheels themselves")
    ap.add_argument("--xz-level", type=int, choices=range(10), default=9, metavar="0-9",
                    help="--site: xz compression level (default 9, the smallest parts; 1 packs a rehearsal "
                         "bundle in seconds)")
    ap.add_argument("--split-mb", type=int, default=0,
                    help="also cut the tarball into OUT/parts/*.part-NN of at most this many MiB (0: no parts; "
                         "without --site the tarball is only written when this is set)")
    args = ap.parse_args(argv)

    env = target_env(args.python_version)
    provided = installed_closure("torch") | {canonicalize_name(n) for n in args.provided.split(",") if n}
    if args.provided_file is not None:
        if not args.provided_file.is_file():
            ap.error(f"--provided-file {args.provided_file}: no such file")
        provided |= read_names(args.provided_file)
    provided |= ALWAYS_PROVIDED
    skip = {canonicalize_name(n) for n in args.skip.split(",") if n}
    skipped: set[str] = set()
    wheels = args.out / "wheels"
    if args.out.exists():
        shutil.rmtree(args.out)
    wheels.mkdir(parents=True)

    roots = {canonicalize_name("selectivemae-ds"): build_local_wheel(str(REPO), wheels)}
    ds_version = installed_version("deepspeed")
    roots[canonicalize_name("deepspeed")] = build_local_wheel(
        f"deepspeed=={ds_version}" if ds_version else "deepspeed", wheels)
    have: dict[str, Path] = dict(roots)
    expanded: dict[str, set[str]] = {name: set() for name in roots}
    todo = [req for path in roots.values() for req in wheel_requires(path, env, set())]
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if name in provided:
            continue
        if name in skip:
            skipped.add(name)
            continue
        if name not in have:
            version = installed_version(name)
            spec = f"{req.name}=={version}" if version and req.specifier.contains(version, prereleases=True) \
                else f"{req.name}{req.specifier}"
            print(f"[wheelhouse] {spec}", flush=True)
            have[name] = pip_download(spec, wheels, args.python_version)
            expanded[name] = set()
            todo.extend(wheel_requires(have[name], env, set()))
        new_extras = set(req.extras) - expanded[name]
        if new_extras:
            expanded[name] |= new_extras
            todo.extend(wheel_requires(have[name], env, new_extras))

    rows = []
    for name, path in sorted(have.items()):
        _n, version, _b, _t = parse_wheel_filename(path.name)
        rows.append(f"{name}\t{version}\t{path.name}\t{sha256(path)}")
    (args.out / "MANIFEST.tsv").write_text("name\tversion\tfile\tsha256\n" + "\n".join(rows) + "\n")
    total = sum(p.stat().st_size for p in have.values())
    print(f"[wheelhouse] {len(have)} wheels, {total / 2**20:.1f} MiB in {wheels}; {len(provided)} names skipped as "
          f"provided (torch's closure, --provided, --provided-file)")
    if skip - skipped:
        ap.error(f"--skip names no package of the closure: {', '.join(sorted(skip - skipped))}")
    if skipped:
        print(f"[wheelhouse] left out (--skip): {', '.join(sorted(skipped))}")

    if args.site:
        site = args.out / "site"
        install_site(sorted(have.values()), site, args.python_version)
        files, size = prune_site(site, args.python_version)
        installed = sum(p.stat().st_size for p in site.rglob("*") if p.is_file())
        print(f"[wheelhouse] site: {installed / 2**20:.1f} MiB installed after pruning {files} files "
              f"({size / 2**20:.1f} MiB) the target never loads")
        tar_xz = pack_site(site, args.out, args.xz_level)
        print(f"[wheelhouse] {tar_xz}: {tar_xz.stat().st_size / 2**20:.1f} MiB")
        if args.split_mb > 0:
            parts = split(tar_xz, args.out / "parts", args.split_mb)
            print(f"[wheelhouse] {len(parts)} parts of <= {args.split_mb} MiB in {args.out / 'parts'}: "
                  + ", ".join(f"{p.name} {p.stat().st_size / 2**20:.1f} MiB" for p in parts))
        return 0

    if args.split_mb > 0:
        parts = args.out / "parts"
        tar_path = args.out / "wheelhouse.tar"
        with tarfile.open(tar_path, "w") as tar:
            tar.add(wheels, arcname="wheels")
            tar.add(args.out / "MANIFEST.tsv", arcname="MANIFEST.tsv")
        split(tar_path, parts, args.split_mb)
        tar_path.unlink()
        print(f"[wheelhouse] parts of <= {args.split_mb} MiB in {parts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
