"""Safety: checkpoints are checked for foreign pickled globals before DeepSpeed (which
unpickles with ``weights_only=False``) or zero_to_fp32 opens them; manifests and shard
metadata are plain JSON, parsed without pickle or eval.

What DeepSpeed 0.19.8 itself does is asserted too: its TorchCheckpointEngine runs the
payload, which is why the check in ``checkpoint.load`` exists.
"""
from __future__ import annotations

import ast
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from selectivemae_ds import checkpoint, export
from selectivemae_ds.data.shards import ShardedDataset, ShardFormatError, read_manifest
from tests.launch import REPO


class _Payload:
    """Unpickling this runs ``os.system("touch MARKER")``: arbitrary code execution."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


def _poisoned_tag(straight: Path, tmp_path: Path, marker: Path) -> Path:
    """A copy of a complete tag whose model-states file carries the payload beside real tensors."""
    tag = shutil.copytree(straight / "checkpoints" / "step_00000002", tmp_path / "checkpoints" / "step_00000002")
    states = tag / "mp_rank_00_model_states.pt"
    sd = torch.load(states, map_location="cpu", weights_only=False)  # our own fresh checkpoint: trusted
    sd["innocent_looking"] = _Payload(marker)
    torch.save(sd, states)
    return tag


def test_real_checkpoints_pass_the_pickle_check(straight_run) -> None:
    for tag in checkpoint.list_complete(straight_run("zero2.json") / "checkpoints"):
        assert checkpoint.check_pickles(tag) >= 3  # model states + one optimizer shard per rank


def test_malicious_pickle_is_refused_before_deepspeed_or_export_open_it(tmp_path: Path, straight_run) -> None:
    marker = tmp_path / "pwned"
    tag = _poisoned_tag(straight_run("zero2.json"), tmp_path, marker)
    target = checkpoint.resolve_resume("auto", tag.parent, json.loads((tag / checkpoint.CLIENT_STATE).read_text())
                                       ["config"], world_size=2)
    assert target is not None and target.tag_dir == tag
    with pytest.raises(checkpoint.UnsafeCheckpointError, match=r"mp_rank_00_model_states.pt: references Python "
                                                               r"globals outside the allowlist \['posix.system'\]"):
        checkpoint.load(engine=None, target=target)  # refused before the engine is touched
    with pytest.raises(checkpoint.UnsafeCheckpointError, match="posix.system"):
        export.load_fp32_state(tag)
    assert not marker.exists()


def test_deepspeed_itself_executes_the_payload(tmp_path: Path) -> None:
    """Documents why the check exists: DeepSpeed 0.19.8's loader unpickles with weights_only=False."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    marker = tmp_path / "ran"
    path = tmp_path / "evil.pt"
    torch.save({"x": _Payload(marker)}, path)
    TorchCheckpointEngine().load(str(path), map_location="cpu")
    assert marker.exists()


# A refused dataset must not leave a broken half-built object behind (its __del__ used to raise).
@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("content", [
    b"\x80\x04\x95\x1d\x00\x00\x00\x00\x00\x00\x00\x8c\x05posix\x94\x8c\x06system\x94\x93\x94.",
    b"{'format': __import__('os').system('touch PWNED'), 'shards': []}",
    b"dict(format='smae-shards', schema=1, shards=[], count=0)",
])
def test_manifest_is_json_only(tmp_path: Path, launch_dataset: Path, content: bytes) -> None:
    root = shutil.copytree(launch_dataset, tmp_path / "d")
    (root / "manifest.json").write_bytes(content)
    with pytest.raises(ShardFormatError, match=r"manifest.json: not valid JSON"):
        read_manifest(root)
    with pytest.raises(ShardFormatError, match=r"not valid JSON"):
        ShardedDataset(root)
    assert not (Path.cwd() / "PWNED").exists() and not (root / "PWNED").exists()


FORBIDDEN_MODULES = {"pickle", "cPickle", "dill", "marshal", "shelve", "cloudpickle", "joblib", "yaml"}
# Exception classes only (to report a file the opcode scan refuses): importing them unpickles nothing.
ALLOWED_NAMES = {("pickle", "UnpicklingError")}
FORBIDDEN_CALLS = {"eval", "exec", "compile", "__import__"}


def _python_files() -> list[Path]:
    files = sorted((REPO / "selectivemae_ds" / "data").glob("*.py")) + sorted((REPO / "data_prep").glob("*.py"))
    files += [REPO / "selectivemae_ds" / "checkpoint.py", REPO / "selectivemae_ds" / "export.py"]
    return files


def test_data_and_checkpoint_code_never_unpickles_or_evaluates() -> None:
    """Shards, manifests, packing state and checkpoint metadata are parsed as JSON/Zarr only:
    no pickle-family import, no eval/exec, and every torch.load asks for weights_only=True."""
    problems: list[str] = []
    for path in _python_files():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                module = node.module or ""
                names = {module.split(".")[0]} if any((module, a.name) not in ALLOWED_NAMES for a in node.names) \
                    else set()
            else:
                names = set()
            problems += [f"{path.name}:{node.lineno} imports {n}" for n in names & FORBIDDEN_MODULES]
            if isinstance(node, ast.Call):
                fn = node.func
                name = fn.id if isinstance(fn, ast.Name) else fn.attr if isinstance(fn, ast.Attribute) else ""
                if isinstance(fn, ast.Name) and name in FORBIDDEN_CALLS:
                    problems.append(f"{path.name}:{node.lineno} calls {name}")
                if name == "load" and isinstance(fn, ast.Attribute) and ast.unparse(fn.value) == "torch":
                    kw = {k.arg: ast.unparse(k.value) for k in node.keywords}
                    if kw.get("weights_only") != "True":
                        problems.append(f"{path.name}:{node.lineno} torch.load without weights_only=True")
    assert not problems, problems
    assert len(_python_files()) >= 15
