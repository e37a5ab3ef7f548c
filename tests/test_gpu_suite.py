"""bench/gpu_call1.sh's CPU rehearsal and bench/gpu_suite.py's --collect: what a device call
writes is what the results table reads.

The rehearsal runs the call-1 script exactly as the device would (same suite code path, toy
sizes) with bench/device_sim blocking every package the GPU machine lacks, so it also proves
that call 1 needs nothing beyond torch and timm.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from bench import gpu_suite

REPO = Path(__file__).resolve().parents[1]
# The keys bench/RESULTS.md's tables and gpu_suite's targets read from every record.
TABLE_KEYS = {"device", "mode", "method", "size", "batch", "img_per_s", "date", "versions", "command"}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def test_call1_dry_run_writes_every_record_with_the_table_keys(tmp_path: Path) -> None:
    out, results = tmp_path / "out", tmp_path / "results"
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable, SMAE_RESULTS=str(results))
    env.pop("PYTHONPATH", None)  # the script sets its own: device_sim first, then the tree
    r = subprocess.run(["bash", str(REPO / "bench" / "gpu_call1.sh"), "--dry-run"], env=env, capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]

    records = read_jsonl(out / "results.jsonl")
    names = [rec["name"] for rec in records]
    assert names == ["model-selectivemae-tiny-b4", "model-mae-tiny-b4", "model-crossmae-tiny-b4", "gpu-tests-model",
                     "model-selectivemae-tiny-b8", "model-mae-tiny-b8"]
    for rec in records:
        assert TABLE_KEYS <= rec.keys(), (rec["name"], TABLE_KEYS - rec.keys())
        assert "error" not in rec, (rec["name"], rec.get("error"), rec.get("stderr_tail"))
        assert rec["device"] == "cpu" and rec["date"] and rec["command"]
        # The machine has neither: the rehearsal ran without them, as call 1 will.
        assert rec["versions"]["deepspeed"] is None and rec["versions"]["dali"] is None
    models = [rec for rec in records if rec["mode"] == "model"]
    assert all(rec["img_per_s"] > 0 and rec["dtype"] == "fp32" for rec in models)
    assert [rec["batch"] for rec in models] == [4, 4, 4, 8, 8]
    tests = next(rec for rec in records if rec["mode"] == "test")
    # Collected and skipped (no CUDA here): every model test module imports without DALI or zarr.
    # test_gpu_model.py: one bf16 test per method, one sync test per (case, progress).
    from selectivemae_ds.models import method_names
    from tests.test_gpu_model import SYNC_CASES

    assert tests["skipped"] == len(method_names()) + 4 * len(SYNC_CASES) and tests["passed"] == tests["failed"] == tests["errors"] == 0
    assert (out / "env-call1.txt").is_file() and (out / "SUMMARY-call1.md").is_file()
    assert "[call1] done, suite exit 0" in r.stdout


def _record(name: str, **fields: object) -> dict:
    base = {"device": "NVIDIA H200", "mode": "model", "method": "selectivemae", "size": "large", "batch": 256,
            "img_per_s": 1000.0, "date": "2026-12-01T00:00:00+00:00", "versions": {"torch": "2.11.0"},
            "command": "smae-bench model", "dtype": "bf16", "mfu": 0.45, "select_share": 0.02}
    return {"name": name, **base, **fields}


def test_collect_writes_one_json_per_record_and_skips_a_cut_last_line(tmp_path: Path) -> None:
    calls = tmp_path / "files_at"
    calls.mkdir()
    lines = [json.dumps(_record("model-selectivemae-large-b256")),
             json.dumps(_record("model-mae-large-b256", method="mae", img_per_s=400.0, mfu=0.5))]
    # A call cut mid-write leaves half a line: the records before it still count.
    (calls / "results.jsonl").write_text("\n".join(lines) + '\n{"name": "model-cross', encoding="utf-8")
    out = tmp_path / "results"
    assert gpu_suite.main(["--collect", str(calls), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.glob("model-*.json")) == ["model-mae-large-b256.json",
                                                               "model-selectivemae-large-b256.json"]
    assert "name" not in json.loads((out / "model-mae-large-b256.json").read_text())
    summary = json.loads((out / "summary.json").read_text())
    ratio = next(t for t in summary["targets"] if t["target"].startswith("selectivemae / mae img/s, ViT-large"))
    assert ratio["value"] == 2.5 and ratio["status"] == "not met"
    mfu = next(t for t in summary["targets"] if t["target"].startswith("model-only MFU"))
    assert mfu["value"] == 0.45 and mfu["status"] == "met"
    assert "Dry run" not in (out / "SUMMARY.md").read_text()


def test_collect_names_a_missing_folder(tmp_path: Path, capsys) -> None:
    assert gpu_suite.main(["--collect", str(tmp_path / "nowhere"), "--out", str(tmp_path / "r")]) == 2
    assert "nowhere: no such file or folder" in capsys.readouterr().err
