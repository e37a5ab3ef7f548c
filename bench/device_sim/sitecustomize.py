"""Makes this interpreter import like the lent GPU machine (bench/GPU_RUNBOOK.md's rehearsal).

Put this folder first on PYTHONPATH (the gpu_call*.sh --dry-run modes do). Every package that
this project's environment has and the machine lacks (bench/gpu_device_packages.txt lists what
it has) then fails to import with ModuleNotFoundError, as it would there, so a CPU rehearsal of
bench/gpu_call1.sh proves the call imports nothing the machine lacks.

With SMAE_DEVICE_SIM_SITE=DIR those packages are imported from DIR only (the folder the wheel
bundle was unpacked into), never from this environment: the rehearsal of the last call then
proves the bundle brings everything the suite imports.
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import re
import sys

# The distributions this environment has and the machine lacks: DeepSpeed, DALI, zarr and what
# they require (the bundle's closure, plus the libraries it leaves out on purpose), and their modules.
MISSING_DISTS = {"deepspeed", "hjson", "pydantic", "pydantic-core", "annotated-types", "typing-inspection",
                 "zarr", "numcodecs", "google-crc32c", "donfig", "nvidia-dali-cuda130", "nvidia-nvimgcodec-cu13",
                 "nvidia-libnvcomp-cu13", "nvidia-nvjpeg", "nvidia-nvjpeg2k-cu13", "nvidia-nvtiff-cu13",
                 "astunparse", "gast", "libcst", "makefun", "nvtx", "optree"}
MISSING = ("deepspeed", "hjson", "pydantic", "pydantic_core", "annotated_types", "typing_inspection",
           "zarr", "numcodecs", "google_crc32c", "donfig",
           "nvidia.dali", "nvidia.nvimgcodec", "nvidia.libnvcomp", "nvidia.nvjpeg2k", "nvidia.nvtiff",
           "astunparse", "gast", "libcst", "makefun", "nvtx", "optree")


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


class _MachinePathFinder(importlib.machinery.PathFinder):
    """sys.meta_path's PathFinder, blind to MISSING outside the bundle: find_spec answers None for
    them (importlib.util.find_spec too), as on the machine, so code that probes before importing
    (torch probes optree) takes the machine's branch."""

    @classmethod
    def find_spec(cls, fullname, path=None, target=None):  # noqa: ANN001 (the finder protocol's signature)
        if fullname not in MISSING:
            return super().find_spec(fullname, path, target)
        if SITE is None:
            return None
        search = [SITE] if path is None else [p for p in path if p.startswith(SITE)]
        return super().find_spec(fullname, search, target)

    @classmethod
    def find_distributions(cls, *args, **kwargs):  # noqa: ANN002, ANN003 (importlib.metadata's protocol)
        """Package metadata likewise (torch asks importlib.metadata whether optree is installed)."""
        for dist in super().find_distributions(*args, **kwargs):
            if _canonical(dist.metadata["Name"] or "") not in MISSING_DISTS or (
                    SITE is not None and str(dist.locate_file("")).startswith(SITE)):
                yield dist


SITE = os.environ.get("SMAE_DEVICE_SIM_SITE") or None
sys.meta_path[:] = [_MachinePathFinder if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
