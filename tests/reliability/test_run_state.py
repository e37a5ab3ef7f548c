"""What a run writes and reads back about itself: strict-JSON metrics, and an input-pipeline
position that only resumes on the dataset it was saved with."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from selectivemae_ds.data.config import DataConfig
from selectivemae_ds.data.pipeline import InputPipeline
from selectivemae_ds.errors import ConfigError
from selectivemae_ds.metrics import MetricsWriter


def _strict(line: str) -> dict:
    def refuse(token: str) -> None:
        raise AssertionError(f"not strict JSON: {token} in {line}")
    return json.loads(line, parse_constant=refuse)


def test_metrics_write_null_for_a_window_without_an_applied_step(tmp_path: Path) -> None:
    writer = MetricsWriter(tmp_path, 0)
    record = {"step": 5, "total_steps": 8, "epoch": 0.5, "samples_seen": 40, "loss": float("nan"), "lr": 1e-3,
              "grad_norm": float("inf"), "img_per_s": 2.0, "img_per_s_per_rank": 1.0, "data_wait": 0.1, "mfu": None,
              "progress": 0.5, "psts_stage": "far", "psts_stage_id": 1.0, "nonfinite_steps": 5, "substituted": 0}
    writer.log(record)
    writer.log({**record, "step": 6, "loss": None, "grad_norm": None})
    writer.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [(r["step"], r["loss"], r["grad_norm"]) for r in map(_strict, lines)] == [(5, None, None), (6, None, None)]


def test_pipeline_resumes_only_on_the_same_dataset(tmp_path: Path, launch_dataset: Path) -> None:
    """Same length, other records (one shard's index changed): the fingerprint, not the length, refuses it."""
    other = Path(shutil.copytree(launch_dataset, tmp_path / "other"))
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["shards"][0]["index_sha256"] = "0" * 64
    (other / "manifest.json").write_text(json.dumps(manifest))

    def pipe(root: Path) -> InputPipeline:
        return InputPipeline(DataConfig(path=str(root), img_size=64, workers=1), seed=0, global_batch=8,
                             micro_batch=8, rank=0, world_size=1)

    saved, moved, changed = pipe(launch_dataset), pipe(Path(shutil.copytree(launch_dataset, tmp_path / "moved"))), \
        pipe(other)
    state = saved.state_dict()
    assert saved.dataset_len == changed.dataset_len and state["dataset_fingerprint"] == saved.dataset_fingerprint
    moved.load_state_dict(state)  # the same dataset under another path resumes
    with pytest.raises(ConfigError, match=r"dataset_fingerprint was '[0-9a-f]{64}' in the checkpoint and is "
                                          r"'[0-9a-f]{64}' now \(data.path holds other records"):
        changed.load_state_dict(state)
    for p in (saved, moved, changed):
        p.close()
