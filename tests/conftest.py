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
        # The marker itself, not `"gpu" in item.keywords`: keywords also hold the names of the
        # folders above the test, so a checkout in a folder named "gpu" would skip every test.
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def assets_dir() -> Path:
    return ASSETS


@pytest.fixture(scope="session")
def launch_dataset(tmp_path_factory) -> Path:
    """40 real JPEG crops of the bundled images in 2 shards, for trainer launches."""
    from tests.shard_fixtures import build_dataset

    return build_dataset(tmp_path_factory.mktemp("launch_ds") / "data", ASSETS, count=40, shards=2)


@pytest.fixture(scope="session")
def straight_run(tmp_path_factory, launch_dataset):
    """The 4-step, 2-rank demo-model run per DeepSpeed JSON and method (checkpoints at steps
    2 and 4), launched once per session and shared by the checkpoint, export, method and
    reliability tests; `method` defaults to the demo's own (`tests.launch.DEMO_METHOD`).
    Tests may add a universal conversion beside a tag; they must not change or remove tags."""
    from tests.launch import DEMO_METHOD, method_args, pretrain

    runs: dict[tuple[str, str], Path] = {}

    def get(ds_json: str, method: str = DEMO_METHOD) -> Path:
        if (ds_json, method) not in runs:
            run = tmp_path_factory.mktemp("straight") / f"{ds_json.removesuffix('.json')}_{method}"
            pretrain(run, launch_dataset, ds_json, *method_args(method))
            runs[ds_json, method] = run
        return runs[ds_json, method]

    return get
