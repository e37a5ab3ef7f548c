import os
from pathlib import Path

import pytest

# DeepSpeed must not probe for accelerators it cannot use on CPU-only machines.
os.environ.setdefault("DS_ACCELERATOR", "cpu")

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / "assets" / "neon"


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def assets_dir() -> Path:
    return ASSETS
