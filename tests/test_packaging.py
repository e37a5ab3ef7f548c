"""An installed wheel works on its own: it declares what the code imports and the Python it
needs, carries the files the commands' defaults read, and nothing in it (or in bench/)
imports the tests.

The wheel is built from a copy of the files ``setup.py`` packages (so the worktree gets
no build/ or egg-info), with the environment's setuptools (``--no-build-isolation``,
no network), then unpacked: a pure wheel unpacked is what pip puts in site-packages.
The tests that build it are marked slow (a few seconds on an idle machine, a minute on a busy one).
"""
from __future__ import annotations

import ast
import email
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGED = ("setup.py", "README.md", "selectivemae_ds", "data_prep", "ds_configs")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    src.mkdir()
    for name in PACKAGED:
        item = REPO / name
        if item.is_dir():
            shutil.copytree(item, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(item, src / name)
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                        "--disable-pip-version-check", "-q", str(src), "-w", str(root / "dist")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    (whl,) = (root / "dist").glob("selectivemae_ds-*.whl")
    return whl


def _metadata(whl: Path) -> email.message.Message:
    with zipfile.ZipFile(whl) as z:
        name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        return email.message_from_bytes(z.read(name))


@pytest.mark.slow
def test_wheel_declares_python_and_every_third_party_import(wheel: Path) -> None:
    meta = _metadata(wheel)
    assert meta["Requires-Python"] == ">=3.11"
    requires = {r.split(";")[0].split(">")[0].split("=")[0].split("<")[0].strip().lower()
                for r in meta.get_all("Requires-Dist")}
    # Import name -> distribution, for every third-party module the packaged code imports.
    distribution = {"torch": "torch", "torchvision": "torchvision", "timm": "timm", "deepspeed": "deepspeed",
                    "nvidia": "nvidia-dali-cuda130", "zarr": "zarr", "numpy": "numpy", "PIL": "pillow",
                    "tqdm": "tqdm", "safetensors": "safetensors", "google_crc32c": "google-crc32c", "obstore": "obstore",
                    "flash_attn": "flash-attn"}
    imported: set[str] = set()
    for package in ("selectivemae_ds", "data_prep"):
        for path in (REPO / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Import):
                    imported.update(alias.name.split(".")[0] for alias in node.names)
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    imported.add(node.module.split(".")[0])
    third_party = {m for m in imported if m not in sys.stdlib_module_names and m not in ("selectivemae_ds", "data_prep")}
    assert third_party <= distribution.keys(), f"imports without a known distribution: {third_party - distribution.keys()}"
    undeclared = {distribution[m] for m in third_party} - requires - {"flash-attn"}  # flash-attn: the [flash] extra
    assert not undeclared, f"imported but not in install_requires: {sorted(undeclared)}"
    pinned = (REPO / "requirements" / "base.txt").read_text()
    assert "google-crc32c==" in pinned


@pytest.mark.slow
def test_wheel_carries_the_defaults_and_no_tests(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        entry_points = z.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    for config in ("zero1", "zero2", "zero3", "cpu_smoke"):
        assert f"selectivemae_ds/ds_configs/{config}.json" in names
    assert "selectivemae_ds/data/crops.py" in names
    assert not [n for n in names if n.startswith("tests/") or "/tests/" in n]
    for command in ("smae-pack", "smae-pretrain", "smae-bench", "smae-eval", "smae-export", "smae-visualize"):
        assert f"{command} = " in entry_points


@pytest.mark.slow
def test_unpacked_wheel_resolves_the_e2e_default_and_never_imports_tests(wheel: Path, tmp_path: Path) -> None:
    """Run from an empty directory with only the unpacked wheel first on the path: the bench
    helpers import, the default --deepspeed-config is the wheel's own zero2.json, and no module
    comes from tests/ or the source checkout."""
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as z:
        z.extractall(site)
    work = tmp_path / "elsewhere"
    work.mkdir()
    program = (
        "import sys\n"
        "import selectivemae_ds.benchmark.cli, selectivemae_ds.benchmark.e2e as e2e\n"
        "import selectivemae_ds.benchmark.loader, selectivemae_ds.benchmark.model, selectivemae_ds.data.crops\n"
        "default = e2e.build_parser().parse_args(['--data', 'x']).deepspeed_config\n"
        "print(e2e.resolve_ds_config(default).resolve())\n"
        "print(sorted(m for m in sys.modules if m == 'tests' or m.startswith('tests.')))\n"
        "print(sorted({str(getattr(m, '__file__', '') or '') for n, m in sys.modules.items()\n"
        "              if n.split('.')[0] in ('selectivemae_ds', 'data_prep')}))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH=str(site), DS_ACCELERATOR="cpu")
    r = subprocess.run([sys.executable, "-c", program], cwd=work, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    resolved, test_modules, files = r.stdout.strip().splitlines()[-3:]
    assert Path(resolved) == (site / "selectivemae_ds" / "ds_configs" / "zero2.json").resolve()
    assert test_modules == "[]"
    assert all(f.startswith(str(site)) for f in ast.literal_eval(files) if f), files


def test_bench_scripts_do_not_import_tests() -> None:
    """Before: bench/loader.py and bench/shard_read.py imported tests.shard_fixtures, and
    bench/gpu_suite.py ran it in a subprocess."""
    offenders = []
    for path in sorted((REPO / "bench").glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            modules = []
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                modules = [node.module]
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and "from tests" in node.value:
                modules = ["tests (in a program string)"]
            offenders += [f"{path.name}: {m}" for m in modules if m == "tests" or m.startswith("tests")]
    assert not offenders, offenders


def test_python_floor_is_stated_the_same_everywhere() -> None:
    assert 'python_requires=">=3.11"' in (REPO / "setup.py").read_text()
    assert "sys.version_info >= (3, 11)" in (REPO / "scripts" / "bootstrap.sh").read_text()
    readme = (REPO / "README.md").read_text()
    assert "Python >= 3.11" in readme and "3.10" not in readme


def test_readme_exit_codes_are_the_errors_modules() -> None:
    """The README's short table lists exactly the codes selectivemae_ds.errors defines (its source)."""
    import re

    from selectivemae_ds import errors

    section = (REPO / "README.md").read_text().split("## Exit codes", 1)[1].split("\n## ", 1)[0]
    listed = re.findall(r"^\| (\d+|128\+N) \|", section, flags=re.MULTILINE)
    defined = sorted(v for k, v in vars(errors).items() if k.startswith("EXIT_"))
    assert listed == [str(v) for v in defined] + ["128+N"]
    for kind in (errors.ConfigError, errors.DataError, errors.CheckpointError, errors.RunError):
        assert f"``{kind.__name__}``" in errors.__doc__
