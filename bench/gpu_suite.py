"""The GPU measurements (issues 7 and 16), each step runnable alone inside one device call.

    python bench/gpu_suite.py --out /tmp/results --only model tests-model  # on the GPU machine
    .venv/bin/python bench/gpu_suite.py --device cpu --quick --out /tmp/r  # CPU dry run: plumbing only
    python bench/gpu_suite.py --collect DIR [DIR ...] --out bench/results  # here: keep what came back

bench/GPU_RUNBOOK.md says which steps each device call runs (bench/gpu_call*.sh). Runs, each
`smae-bench` mode in its own subprocess with a timeout (a failure or a hang is recorded as a
JSON with an ``error`` and the rest still runs), in this order:

1. ``model``: every method x size, bf16, synthetic batches already on the device
   (img/s, HOG+PSTS share of the step, MFU, peak memory); needs only torch and timm;
2. ``tests-model``: ``pytest -m gpu tests/test_gpu_model.py`` (no DALI, zarr or DeepSpeed);
3. a benchmark dataset (for the next three): real JPEG crops of ``assets/neon``
   (``selectivemae_ds.data.crops.build_crop_dataset``, seeded), reused when already built;
4. ``e2e``: selectivemae at the "B" size through DALI mixed decode and the DeepSpeed engine (ZeRO-2);
5. ``loader``: the DALI pipeline alone (mixed decode on CUDA), no baseline unless asked;
6. ``memory``: ``e2e`` at the "L" size with micro-batch 1024 under ZeRO-2 (peak allocated memory);
7. ``tests-data``: ``pytest -m gpu tests/test_gpu.py tests/test_pipeline.py`` (DALI mixed decode).

Writes one JSON per measurement into ``--out`` (``device`` = the GPU's name, ``mode``,
``method``, ``size``, ``batch``, ``img_per_s``, ``date``, ``versions``, ``command``, ...),
``summary.json`` (targets, ratios, every sub-run's status) and ``SUMMARY.md``, and prints the
markdown tables: each target with the measured value and met / not met. With ``--jsonl FILE``
every record is also appended to FILE the moment it exists (one line, with its ``name``), so a
call cut short still returns what it measured; ``--collect`` turns such files back into the
per-measurement JSONs and the tables. The suite stops starting sub-runs once ``--budget-s`` is spent.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from selectivemae_ds.benchmark.model import versions  # noqa: E402

METHODS = ("selectivemae", "mae", "crossmae")
STEPS = ("model", "tests-model", "e2e", "loader", "memory", "tests-data")
# The pytest files of each test step: tests-model imports no DALI, zarr or DeepSpeed.
TEST_FILES = {"tests-model": ["tests/test_gpu_model.py"], "tests-data": ["tests/test_gpu.py", "tests/test_pipeline.py"]}
PYTEST_COUNT = re.compile(r"(\d+) (passed|failed|skipped|error|errors|deselected)\b")
# A sub-run is not started with less budget left than this (it could not finish).
MIN_START_S = 15.0

# GPU defaults (one H100, bf16) and the CPU dry run's (--quick): sizes the plumbing, not the GPU.
DEFAULTS: dict[str, Any] = {
    "img_size": 224, "sizes": ["base", "large", "small"], "b_size": "base", "l_size": "large",
    "model_batch": 256, "model_steps": 20, "model_warmup": 5,
    "count": 2048, "min_side": 256, "max_side": 512,
    "e2e_batch": 1024, "e2e_micro_batch": 256, "e2e_steps": 15, "e2e_warmup": 3,
    "loader_batch": 256, "loader_steps": 30, "loader_warmup": 5, "workers": 8, "decode_threads": 8,
    "mem_batch": 1024, "mem_steps": 2, "mem_warmup": 1,
    "model_timeout": 150, "e2e_timeout": 240, "loader_timeout": 150, "tests_timeout": 300,
}
QUICK: dict[str, Any] = {
    "img_size": 64, "sizes": ["tiny"], "b_size": "tiny", "l_size": "tiny",
    "model_batch": 4, "model_steps": 2, "model_warmup": 1,
    "count": 32, "min_side": 96, "max_side": 200,
    "e2e_batch": 8, "e2e_micro_batch": 4, "e2e_steps": 2, "e2e_warmup": 1,
    "loader_batch": 8, "loader_steps": 3, "loader_warmup": 1, "workers": 1, "decode_threads": 1,
    "mem_batch": 8, "mem_steps": 1, "mem_warmup": 1,
    "model_timeout": 150, "e2e_timeout": 240, "loader_timeout": 150, "tests_timeout": 300,
}


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def last_json(text: str) -> dict[str, Any] | None:
    """The last stdout line that parses as a JSON object (the smae-bench record), or None."""
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError:
            continue  # a log line that merely starts with "{"; keep looking upwards
        if isinstance(value, dict):
            return value
    return None


@dataclass
class Suite:
    """Where results go, the shared fields of every record, and the clock of the budget."""

    out: Path
    device: str
    device_name: str
    deadline: float
    versions: dict[str, str | None]
    env: dict[str, str]
    jsonl: Path | None = None
    runs: list[dict[str, Any]] = field(default_factory=list)

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def write(self, name: str, record: dict[str, Any]) -> dict[str, Any]:
        path = self.out / f"{name}.json"
        path.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
        if self.jsonl is not None:
            with open(self.jsonl, "a", encoding="utf-8") as f:
                f.write(json.dumps({"name": name, **record}) + "\n")
                f.flush()
                os.fsync(f.fileno())
        self.runs.append({"name": name, "ok": "error" not in record, "wall_s": record.get("wall_s"),
                          "error": record.get("error")})
        status = f"error: {record['error']}" if "error" in record else f"img/s {record.get('img_per_s')}"
        print(f"[suite] {name}: {status} ({record.get('wall_s')} s) -> {path}", flush=True)
        return record

    def subprocess(self, argv: list[str], timeout: float) -> tuple[int | None, str, str, float, str | None]:
        """Run ``python ARGV`` in the repo; (rc, stdout, stderr, seconds, error or None)."""
        left = self.remaining()
        if left < MIN_START_S:
            return None, "", "", 0.0, f"not started: the suite's --budget-s left {max(left, 0):.0f} s"
        limit = min(timeout, left)
        start = time.monotonic()
        # A session of its own, so a timeout ends the whole tree (DALI workers, pytest's children) by group id.
        proc = subprocess.Popen([sys.executable, *argv], cwd=REPO, env=self.env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            out, errs = proc.communicate(timeout=limit)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, errs = proc.communicate()
            return None, out, errs, time.monotonic() - start, f"timed out after {limit:.0f} s"
        seconds = time.monotonic() - start
        rc = proc.returncode
        return rc, out, errs, seconds, None if rc == 0 else f"exit code {rc}"

    def bench(self, name: str, argv: list[str], timeout: float, meta: dict[str, Any]) -> dict[str, Any]:
        """One `smae-bench` sub-run -> one JSON file; ``meta`` fills the required keys on failure."""
        command = "smae-bench " + shlex.join(argv)
        rc, stdout, stderr, seconds, error = self.subprocess(["-m", "selectivemae_ds.benchmark.cli", *argv], timeout)
        record = last_json(stdout) if error is None else None
        if error is None and record is None:
            error = "no JSON record on stdout"
        base = {"mode": meta.get("mode"), "method": meta.get("method"), "size": meta.get("size"),
                "batch": meta.get("batch"), "img_per_s": None}
        if record is None:
            record = {**base, "error": error, "returncode": rc, "stderr_tail": stderr[-3000:],
                      "stdout_tail": stdout[-1000:]}
        else:
            record = {**base, **record}
        # Child records say "cuda"/"cpu" in different keys; every result file names the GPU in `device`.
        record["device_type"] = self.device
        record["device"] = self.device_name
        record.update(date=utc_now(), versions=record.get("versions") or self.versions, command=command,
                      wall_s=round(seconds, 1))
        return self.write(name, record)


def build_dataset(suite: Suite, args: argparse.Namespace) -> tuple[Path | None, str | None]:
    """The benchmark dataset (built in a subprocess, reused when complete); (path, error)."""
    root = args.data_dir or Path(tempfile.gettempdir()) / (
        f"smae-gpu-suite-data-{args.count}-{args.min_side}-{args.max_side}")
    if (root / "manifest.json").is_file():
        print(f"[suite] dataset: reusing {root}", flush=True)
        return root, None
    program = ("from selectivemae_ds.data.crops import build_crop_dataset; "
               f"build_crop_dataset({str(root)!r}, {str(REPO / 'assets' / 'neon')!r}, count={args.count}, "
               f"shards=4, min_side={args.min_side}, max_side={args.max_side})")
    rc, _out, err, seconds, error = suite.subprocess(["-c", program], 300)
    print(f"[suite] dataset: {args.count} crops {args.min_side}-{args.max_side} px in {root} "
          f"({seconds:.1f} s){'' if error is None else ' FAILED: ' + error}", flush=True)
    if error is not None:
        return None, f"dataset build failed ({error}): {err[-500:]}"
    return root, None


def run_tests(suite: Suite, step: str, timeout: float) -> dict[str, Any]:
    """The gpu-marked tests of one test step; counts parsed from pytest's closing line."""
    argv = ["-m", "pytest", "-m", "gpu", *TEST_FILES[step], "-q", "-p", "no:cacheprovider",
            # The ini's --timeout needs pytest-timeout; the suite's own timeout covers a hang.
            "-o", "addopts=-ra"]
    rc, stdout, stderr, seconds, error = suite.subprocess(argv, timeout)
    # pytest's closing line, e.g. "3 passed, 12 skipped in 41.2s" (the last line naming a count).
    closing = next((line.strip("= ") for line in reversed(stdout.strip().splitlines()) if PYTEST_COUNT.search(line)),
                   "")
    counts = {word: int(num) for num, word in PYTEST_COUNT.findall(closing)}
    record: dict[str, Any] = {"mode": "test", "step": step, "method": None, "size": None, "batch": None, "img_per_s": None,
                              "passed": counts.get("passed", 0), "failed": counts.get("failed", 0),
                              "skipped": counts.get("skipped", 0), "errors": counts.get("error", 0) + counts.get("errors", 0),
                              "closing_line": closing, "returncode": rc, "output_tail": stdout[-4000:]}
    if error is not None:
        record["error"] = error
        record["stderr_tail"] = stderr[-2000:]
    record.update(device_type=suite.device, device=suite.device_name, date=utc_now(), versions=suite.versions,
                  command="python " + shlex.join(argv), wall_s=round(seconds, 1))
    return suite.write(f"gpu-{step}", record)


def find(records: list[dict[str, Any]], **match: Any) -> dict[str, Any] | None:
    """The first successful record whose fields equal ``match``."""
    for rec in records:
        if "error" not in rec and all(rec.get(k) == v for k, v in match.items()):
            return rec
    return None


@dataclass
class Target:
    """One issue-7 target: how to read its value from the records and when it is met."""

    label: str
    goal: str
    value: Callable[[list[dict[str, Any]]], float | None]
    met: Callable[[float], bool]
    fmt: str


def ratio(a: dict[str, Any] | None, b: dict[str, Any] | None) -> float | None:
    if a is None or b is None or not a.get("img_per_s") or not b.get("img_per_s"):
        return None
    return a["img_per_s"] / b["img_per_s"]


def field_of(rec: dict[str, Any] | None, key: str) -> float | None:
    return None if rec is None else rec.get(key)


def targets(args: argparse.Namespace) -> list[Target]:
    b, large = args.b_size, args.l_size
    dt = "bf16" if args.device == "cuda" else "fp32"

    def model(method: str, size: str) -> Callable[[list[dict[str, Any]]], dict[str, Any] | None]:
        return lambda rs: find(rs, mode="model", method=method, size=size, dtype=dt, batch=args.model_batch)

    def best_mfu(rs: list[dict[str, Any]]) -> float | None:
        values = [rec["mfu"] for rec in rs if "error" not in rec and rec.get("mode") == "model"
                  and rec.get("method") == "selectivemae" and rec.get("size") == large and rec.get("dtype") == dt
                  and rec.get("mfu") is not None]
        return max(values) if values else None

    def e2e_b(rs: list[dict[str, Any]]) -> dict[str, Any] | None:
        return find(rs, mode="e2e", method="selectivemae", size=b, micro_batch=args.e2e_micro_batch)

    def psts(rs: list[dict[str, Any]]) -> float | None:
        shares = [rec["select_share"] for rec in rs if "error" not in rec and rec.get("mode") == "model"
                  and rec.get("method") == "selectivemae" and rec.get("select_share") is not None]
        return max(shares) if shares else None

    def memory(rs: list[dict[str, Any]]) -> float | None:
        return field_of(find(rs, mode="e2e", size=large, micro_batch=args.mem_batch, steps=args.mem_steps),
                        "peak_mem_gb")

    return [
        Target(f"e2e img/s, selectivemae ViT-{b} {args.img_size} px (batch {args.e2e_batch} = "
               f"{args.e2e_batch // args.e2e_micro_batch} x {args.e2e_micro_batch}), DALI + ZeRO-2",
               ">= 5000", lambda rs: field_of(e2e_b(rs), "img_per_s"), lambda v: v >= 5000, ".1f"),
        Target(f"selectivemae / mae img/s, ViT-{b} (model-only, same run)", ">= 3.0",
               lambda rs: ratio(model("selectivemae", b)(rs), model("mae", b)(rs)), lambda v: v >= 3.0, ".2f"),
        Target(f"selectivemae / mae img/s, ViT-{large} (model-only, same run)", ">= 3.5",
               lambda rs: ratio(model("selectivemae", large)(rs), model("mae", large)(rs)), lambda v: v >= 3.5, ".2f"),
        Target(f"e2e / model-only img/s, selectivemae ViT-{b} (model batch {args.model_batch})", ">= 0.90",
               lambda rs: ratio(e2e_b(rs), model("selectivemae", b)(rs)), lambda v: v >= 0.90, ".3f"),
        Target(f"model-only MFU, selectivemae ViT-{large} (989 TF/s dense bf16 peak; best batch run)", ">= 40%",
               best_mfu, lambda v: v >= 0.40, ".1%"),
        Target("HOG + PSTS share of the selectivemae step (largest over the sizes run)", "<= 5%",
               psts, lambda v: v <= 0.05, ".2%"),
        Target(f"peak memory (torch allocator), e2e ViT-{large} micro-batch {args.mem_batch}, ZeRO-2 (GB = 1e9 B)",
               "< 40 GB",
               memory, lambda v: v < 40.0, ".2f"),
    ]


def earlier_results(out: Path, skip: set[str], device: str) -> list[tuple[str, dict[str, Any]]]:
    """Result files already in ``out`` from an earlier invocation on the same device (e.g. before an
    ``--only`` rerun of the failed steps), so the target table still sees every measurement."""
    found = []
    for path in sorted(out.glob("*.json")):
        if path.stem in skip or path.name == "summary.json":
            continue
        record = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(record, dict) and record.get("device") == device:
            found.append((path.stem, record))
    return found


def tables(args: argparse.Namespace, device_name: str, dry: str | None,
           named: list[tuple[str, dict[str, Any]]]) -> tuple[str, list[dict[str, Any]]]:
    """The markdown summary (targets, then every run) and the target rows as data.

    ``dry`` names a dry run ("CPU", "--quick"), None for measurements; the versions line lists
    every distinct version set among the records (the calls of one session may differ: DALI and
    DeepSpeed exist only after the bundle is installed)."""
    records = [rec for _name, rec in named]
    seen = []
    for rec in records:
        v = rec.get("versions") or {}
        text = (f"torch {v.get('torch')}, deepspeed {v.get('deepspeed')}, DALI {v.get('dali')}, "
                f"timm {v.get('timm')}, Python {v.get('python')}")
        if text not in seen:
            seen.append(text)
    lines = [f"Device: {device_name}; " + " / ".join(seen) + f"; tables made {utc_now()}", ""]
    if dry is not None:
        lines += [f"**Dry run ({dry}): plumbing only, toy sizes; "
                  "no value below is a measurement against the GPU targets.**", ""]
    lines += ["| target | goal | measured | status |", "|---|---|---|---|"]
    rows = []
    for t in targets(args):
        value = t.value(records)
        status = "no result" if value is None else ("met" if t.met(value) else "not met")
        shown = "-" if value is None else format(value, t.fmt)
        lines.append(f"| {t.label} | {t.goal} | {shown} | {status} |")
        rows.append({"target": t.label, "goal": t.goal, "value": value, "status": status})
    lines += ["", "| run | img/s | step ms | other | wall s |", "|---|---|---|---|---|"]
    for name, rec in named:
        if "error" in rec:
            other = f"ERROR: {rec['error']}"
        elif rec.get("mode") == "model":
            other = (f"select {rec.get('select_share', 0):.2%}, MFU {_pct(rec.get('mfu'))}, "
                     f"peak {_gb(rec.get('peak_mem_gb'))}, batch {rec.get('batch')}")
        elif rec.get("mode") == "e2e":
            other = (f"wait {rec.get('data_wait_fraction', 0):.1%}, MFU {_pct(rec.get('mfu'))}, peak "
                     f"{_gb(rec.get('peak_mem_gb'))} (device {_gb(rec.get('device_used_gb'))}), batch {rec.get('batch')} = {rec.get('accum')} x "
                     f"{rec.get('micro_batch')}, decode {rec.get('decode_device')}")
        elif rec.get("mode") == "loader":
            other = f"decode {rec.get('decode_device')}, batch {rec.get('batch')}, {rec.get('workers')} workers"
        else:
            other = rec.get("closing_line", "")
        lines.append(f"| {name} | {rec.get('img_per_s') if rec.get('img_per_s') is not None else '-'} | "
                     f"{rec.get('step_ms', '-')} | {other} | {rec.get('wall_s')} |")
    return "\n".join(lines) + "\n", rows


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def _gb(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f} GB"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=None,
                   help="folder for the result JSONs (default: bench/results; for a dry run a temp folder, "
                        "so dry-run files never land among the measurements)")
    p.add_argument("--jsonl", type=Path, default=None,
                   help="also append every record to this file as it is made (one JSON line with its name): "
                        "what a device call cut short still brings back")
    p.add_argument("--collect", type=Path, nargs="+", default=None, metavar="DIR_OR_FILE",
                   help="run nothing: read the records of these .jsonl files (or of every *.jsonl in these "
                        "folders: the files_at folders of the device calls), write one JSON per record into "
                        "--out and the tables over all of --out's results of that device")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: a dry run of the plumbing")
    p.add_argument("--quick", action="store_true", help="toy sizes and step counts (the CPU dry run's)")
    p.add_argument("--only", nargs="+", choices=STEPS, default=list(STEPS),
                   help="run only these steps (in the suite's order; default: all)")
    p.add_argument("--budget-s", type=float, default=540.0,
                   help="no sub-run starts after this many seconds; each is cut off at the budget's end")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS), help="model-only methods")
    p.add_argument("--sizes", nargs="+", default=None, help="model-only sizes (default: base large small)")
    p.add_argument("--b-size", default=None, help='the "ViT-B" size of the targets (e2e, ratio)')
    p.add_argument("--l-size", default=None, help='the "ViT-L" size of the targets (ratio, MFU, memory)')
    p.add_argument("--img-size", type=int, default=None, help="image side (default 224)")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="benchmark dataset (built there if absent; default: a folder in the temp dir)")
    p.add_argument("--count", type=int, default=None, help="records in the benchmark dataset (default 2048)")
    p.add_argument("--min-side", type=int, default=None, help="smallest crop side (default 256)")
    p.add_argument("--max-side", type=int, default=None, help="largest crop side (default 512)")
    for name, text in (("model-batch", "model-only images per step"), ("model-steps", "model-only timed steps"),
                       ("model-warmup", "model-only untimed steps"), ("e2e-batch", "e2e global batch"),
                       ("e2e-micro-batch", "e2e micro-batch"), ("e2e-steps", "e2e timed steps"),
                       ("e2e-warmup", "e2e untimed steps"), ("loader-batch", "loader batch"),
                       ("loader-steps", "loader timed batches"), ("loader-warmup", "loader untimed batches"),
                       ("workers", "DALI source workers (loader, e2e)"),
                       ("decode-threads", "DALI decode threads (loader, e2e)"),
                       ("mem-batch", "memory run's micro-batch (= global batch)"),
                       ("mem-steps", "memory run's timed steps"), ("mem-warmup", "memory run's untimed steps"),
                       ("model-timeout", "seconds per model-only sub-run"), ("e2e-timeout", "seconds per e2e sub-run"),
                       ("loader-timeout", "seconds for the loader sub-run"),
                       ("tests-timeout", "seconds per pytest step")):
        p.add_argument(f"--{name}", type=int, default=None, help=f"{text} (default: see DEFAULTS / QUICK)")
    p.add_argument("--loader-baseline", action="store_true", help="also time the PIL/torchvision baseline loader")
    p.add_argument("--deepspeed-config", default=None,
                   help="ZeRO-2 JSON (default: ds_configs/zero2.json on cuda, ds_configs/cpu_smoke.json on cpu)")
    return p


def collect(args: argparse.Namespace, given: list[str]) -> int:
    """--collect: the device calls' .jsonl records -> one JSON per record in --out, and the tables."""
    files: list[Path] = []
    for src in args.collect:
        if src.is_dir():
            files += sorted(src.glob("*.jsonl"))
        elif src.is_file():
            files.append(src)
        else:
            print(f"gpu_suite --collect: {src}: no such file or folder", file=sys.stderr)
            return 2
    if not files:
        print(f"gpu_suite --collect: no .jsonl file in {', '.join(map(str, args.collect))}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    devices: list[str] = []
    for path in files:
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                # A call cut mid-write leaves a partial last line; anything else is a damaged file.
                print(f"gpu_suite --collect: {path}:{number}: not JSON ({err}); skipped", file=sys.stderr)
                continue
            name = record.pop("name")
            (args.out / f"{name}.json").write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
            print(f"[collect] {path.name}:{number} -> {args.out / (name + '.json')}")
            if record.get("device") not in devices:
                devices.append(record.get("device"))
    device = devices[-1]
    named = earlier_results(args.out, set(), device)
    text, rows = tables(args, device, "CPU" if device == "cpu" else None, named)
    summary = {"mode": "summary", "device": device, "date": utc_now(),
               "command": "python bench/gpu_suite.py " + shlex.join(given), "targets": rows,
               "runs": [{"name": name, "ok": "error" not in rec, "wall_s": rec.get("wall_s"), "error": rec.get("error")}
                        for name, rec in named], "collected_from": [str(f) for f in files]}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    (args.out / "SUMMARY.md").write_text(text, encoding="utf-8")
    print("\n" + text, flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    given = sys.argv[1:] if argv is None else argv
    for key, value in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.collect is not None:
        if args.out is None:
            args.out = REPO / "bench" / "results"
        return collect(args, given)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_suite: --device cuda but torch sees no CUDA device (use --device cpu --quick for a dry run)",
              file=sys.stderr)
        return 2
    if args.out is None:
        dry = args.device != "cuda" or args.quick
        args.out = Path(tempfile.gettempdir()) / "smae-gpu-suite-dry-run" if dry else REPO / "bench" / "results"
    ds_config = args.deepspeed_config or ("ds_configs/zero2.json" if args.device == "cuda"
                                          else "ds_configs/cpu_smoke.json")
    args.out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if args.device == "cpu":
        env["DS_ACCELERATOR"] = "cpu"
    suite = Suite(out=args.out, device=args.device,
                  device_name=torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu",
                  deadline=time.monotonic() + args.budget_s, versions=versions(), env=env, jsonl=args.jsonl)
    started = time.monotonic()
    print(f"[suite] {suite.device_name}, versions {suite.versions}, out {args.out}, budget {args.budget_s:.0f} s",
          flush=True)
    dtype = ["--dtype", "bf16"] if args.device == "cuda" else ["--dtype", "fp32"]
    records: list[dict[str, Any]] = []

    if "model" in args.only:
        for size in args.sizes:
            for method in args.methods:
                argv_ = ["model", "--method", method, "--size", size, "--batch", str(args.model_batch),
                         "--steps", str(args.model_steps), "--warmup", str(args.model_warmup),
                         "--device", args.device, "--img-size", str(args.img_size), *dtype]
                records.append(suite.bench(f"model-{method}-{size}-b{args.model_batch}", argv_, args.model_timeout,
                                           {"mode": "model", "method": method, "size": size,
                                            "batch": args.model_batch}))

    data, data_error = (None, None)
    if "tests-model" in args.only:
        records.append(run_tests(suite, "tests-model", args.tests_timeout))

    if {"e2e", "loader", "memory"} & set(args.only):
        data, data_error = build_dataset(suite, args)
    data_opts = ["--workers", str(args.workers), "--decode-threads", str(args.decode_threads)]

    def e2e(name: str, size: str, batch: int, micro: int, steps: int, warmup: int) -> None:
        meta = {"mode": "e2e", "method": "selectivemae", "size": size, "batch": batch}
        if data is None:
            records.append(suite.write(name, {**meta, "img_per_s": None, "error": data_error, "device": suite.device_name,
                                              "date": utc_now(), "versions": suite.versions, "command": None}))
            return
        argv_ = ["e2e", "--data", str(data), "--method", "selectivemae", "--size", size, "--batch", str(batch),
                 "--micro-batch", str(micro), "--steps", str(steps), "--warmup", str(warmup),
                 "--deepspeed-config", ds_config, "--device", args.device, "--img-size", str(args.img_size),
                 *data_opts]
        records.append(suite.bench(name, argv_, args.e2e_timeout, meta))

    if "e2e" in args.only:
        e2e(f"e2e-selectivemae-{args.b_size}", args.b_size, args.e2e_batch, args.e2e_micro_batch, args.e2e_steps,
            args.e2e_warmup)
    if "loader" in args.only:
        meta = {"mode": "loader", "method": None, "size": None, "batch": args.loader_batch}
        name = f"loader-{'mixed' if args.device == 'cuda' else 'cpu'}"
        if data is None:
            records.append(suite.write(name, {**meta, "img_per_s": None, "error": data_error,
                                              "device": suite.device_name, "date": utc_now(),
                                              "versions": suite.versions, "command": None}))
        else:
            argv_ = ["loader", "--data", str(data), "--device", args.device, "--batch", str(args.loader_batch),
                     "--steps", str(args.loader_steps), "--warmup", str(args.loader_warmup),
                     "--img-size", str(args.img_size), "--dtype", "bfloat16" if args.device == "cuda" else "float32",
                     *data_opts, *([] if args.loader_baseline else ["--no-baseline"])]
            records.append(suite.bench(name, argv_, args.loader_timeout, meta))
    if "memory" in args.only:
        e2e(f"memory-e2e-selectivemae-{args.l_size}-mb{args.mem_batch}", args.l_size, args.mem_batch,
            args.mem_batch, args.mem_steps, args.mem_warmup)
    if "tests-data" in args.only:
        records.append(run_tests(suite, "tests-data", args.tests_timeout))

    names = [run["name"] for run in suite.runs]
    earlier = earlier_results(args.out, set(names), suite.device_name)
    dry = None if suite.device == "cuda" and not args.quick else ("CPU" if suite.device != "cuda" else "--quick")
    text, rows = tables(args, suite.device_name, dry, earlier + list(zip(names, records)))
    summary = {"mode": "summary", "device": suite.device_name, "device_type": suite.device, "date": utc_now(),
               "versions": suite.versions, "command": "python bench/gpu_suite.py " + shlex.join(given),
               "quick": args.quick, "platform": platform.platform(), "cpu_count": os.cpu_count(),
               "wall_s": round(time.monotonic() - started, 1), "targets": rows, "runs": suite.runs,
               "earlier_results_used": [name for name, _rec in earlier],
               "dataset": None if data is None else {"path": str(data), "records": args.count,
                                                     "sides": [args.min_side, args.max_side]}}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    (args.out / "SUMMARY.md").write_text(text, encoding="utf-8")
    print("\n" + text, flush=True)
    failed = [run["name"] for run in suite.runs if not run["ok"]]
    print(f"[suite] {len(suite.runs)} sub-runs, {len(failed)} failed{': ' + ', '.join(failed) if failed else ''}; "
          f"{summary['wall_s']} s; results in {args.out}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
