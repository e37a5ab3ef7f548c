"""Safety: checkpoints are checked for foreign pickled globals before DeepSpeed (which
unpickles with ``weights_only=False``), zero_to_fp32 or ds_to_universal opens them; links
inside a tag and files the static check cannot read are refused; manifests and shard
metadata are plain JSON, parsed without pickle or eval.

Every payload here would ``touch`` a marker file when unpickled; each test asserts the
marker does not exist afterwards.

What DeepSpeed 0.19.8 itself does is asserted too: its TorchCheckpointEngine runs the
payload, which is why the check in ``checkpoint.load`` exists.
"""
from __future__ import annotations

import ast
import contextlib
import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from selectivemae_ds import checkpoint, export
from selectivemae_ds.data.shards import ShardedDataset, ShardFormatError, read_manifest
from selectivemae_ds.errors import EXIT_CHECKPOINT, CheckpointError, run_cli
from tests.launch import REPO, pretrain


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
    config = json.loads((tag / checkpoint.CLIENT_STATE).read_text())["config"]
    refusal = r"mp_rank_00_model_states.pt: references Python globals outside the allowlist \['posix.system'\]"
    with pytest.raises(checkpoint.UnsafeCheckpointError, match=refusal):
        checkpoint.resolve_resume(str(tag), tag.parent, config, world_size=2)
    with pytest.raises(checkpoint.DamagedCheckpointError, match="none of the 1 complete checkpoints .*" + refusal):
        checkpoint.resolve_resume("auto", tag.parent, config, world_size=2)
    target = checkpoint.ResumeTarget(tag_dir=tag, client_state={}, universal=False)
    with pytest.raises(checkpoint.UnsafeCheckpointError, match=refusal):
        checkpoint.load(engine=None, target=target)  # refused before the engine is touched
    with pytest.raises(checkpoint.UnsafeCheckpointError, match="posix.system"):
        export.load_fp32_state(tag)
    assert not marker.exists()


def test_to_universal_checks_the_pickles_before_ds_to_universal_opens_them(tmp_path: Path, straight_run, capsys) -> None:
    """The documented way to change the number of GPUs ran ds_to_universal (weights_only=False) unchecked."""
    marker = tmp_path / "pwned"
    tag = _poisoned_tag(straight_run("zero2.json"), tmp_path, marker)
    rc = run_cli(checkpoint.main, ["to-universal", str(tag)])
    err = capsys.readouterr().err
    assert rc == EXIT_CHECKPOINT
    assert f"checkpoint error: {tag / 'mp_rank_00_model_states.pt'}: references Python globals outside the " \
           "allowlist ['posix.system']" in err
    assert not marker.exists()
    assert not tag.with_name(tag.name + checkpoint.UNIVERSAL_SUFFIX).exists()


def _payload_file(path: Path, marker: Path, how: str) -> None:
    """Write a payload that runs when unpickled: a torch zip whose pickle is protocol 4 or 5, a raw
    pickle, or torch's legacy (non-zip) format."""
    obj = {"w": torch.zeros(2), "x": _Payload(marker)}
    if how in ("zip protocol 4", "zip protocol 5"):
        torch.save(obj, path, pickle_protocol=int(how[-1]))
    elif how == "raw pickle protocol 4":
        path.write_bytes(pickle.dumps(obj, protocol=4))
    elif how == "legacy torch format":
        torch.save(obj, path, _use_new_zipfile_serialization=False)
    else:
        raise AssertionError(how)


@pytest.mark.parametrize("how, reason", [
    ("zip protocol 4", "its pickle holds opcodes outside what torch.save writes (UnpicklingError: Unsupported operand 149"),
    ("zip protocol 5", "its pickle holds opcodes outside what torch.save writes (UnpicklingError: Unsupported operand 149"),
    ("raw pickle protocol 4", "not a torch zip checkpoint"),
    ("legacy torch format", "not a torch zip checkpoint"),
])
def test_files_the_scan_cannot_read_are_refused_with_the_same_message(tmp_path: Path, how: str, reason: str) -> None:
    """A protocol-4 pickle inside a torch zip used to escape as ``UnpicklingError: Unsupported
    operand 149``; every such file is now an UnsafeCheckpointError naming it, like a foreign global."""
    marker = tmp_path / "pwned"
    tag = tmp_path / "step_00000002"
    tag.mkdir()
    bad = tag / "mp_rank_00_model_states.pt"
    _payload_file(bad, marker, how)
    with pytest.raises(checkpoint.UnsafeCheckpointError) as info:
        checkpoint.check_pickles(tag)
    assert str(info.value).startswith(f"{bad}: {reason}")
    assert "; refusing to load it" in str(info.value)
    assert not marker.exists()
    # The payload is real: DeepSpeed's own loader runs it (a raw pickle then fails torch's magic-number check).
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    with contextlib.suppress(RuntimeError):
        TorchCheckpointEngine().load(str(bad), map_location="cpu")
    assert marker.exists()


def _linked_tag(straight: Path, tmp_path: Path, marker: Path, what: str) -> tuple[Path, Path]:
    """A copy of the step-2 tag with a symbolic link inside pointing at a payload outside the tag;
    returns (tag, link)."""
    tag = Path(shutil.copytree(straight / "checkpoints" / "step_00000002", tmp_path / "checkpoints" / "step_00000002"))
    elsewhere = tmp_path / "elsewhere"
    if what == "zero/ directory":
        param = elsewhere / "zero" / "encoder.cls_token"
        param.mkdir(parents=True)
        torch.save({"param": _Payload(marker)}, param / "fp32.pt")
        link = tag / "zero"
        link.symlink_to(elsewhere / "zero", target_is_directory=True)
    else:
        elsewhere.mkdir()
        torch.save({"x": _Payload(marker)}, elsewhere / "evil.pt")
        link = tag / "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"
        link.unlink()
        link.symlink_to(elsewhere / "evil.pt")
    return tag, link


@pytest.mark.parametrize("what", ["zero/ directory", "optimizer shard file"])
def test_links_inside_a_tag_are_refused_by_every_entry_point(tmp_path: Path, straight_run, capsys, what: str) -> None:
    """rglob("*.pt") did not enter a symlinked zero/ (Python 3.11), while DeepSpeed treats the tag
    as universal and unpickles every zero/<param>/*.pt: resume, export and to-universal all refuse
    the link now, naming it."""
    marker = tmp_path / "pwned"
    tag, link = _linked_tag(straight_run("zero2.json"), tmp_path, marker, what)
    message = f"{link}: a symbolic link inside the checkpoint"
    with pytest.raises(checkpoint.UnsafeCheckpointError, match=message):
        checkpoint.check_pickles(tag)
    config = json.loads((tag / checkpoint.CLIENT_STATE).read_text())["config"]
    for resume in (str(tag), "auto"):
        with pytest.raises(CheckpointError, match=message):
            checkpoint.resolve_resume(resume, tag.parent, config, world_size=2)
    with pytest.raises(checkpoint.UnsafeCheckpointError, match=message):
        export.load_fp32_state(tag)
    assert run_cli(checkpoint.main, ["to-universal", str(tag)]) == EXIT_CHECKPOINT
    assert message in capsys.readouterr().err
    assert not marker.exists()


@pytest.mark.slow
def test_resume_from_a_tag_with_a_symlinked_zero_dir_never_runs_the_payload(tmp_path: Path, launch_dataset: Path,
                                                                           straight_run) -> None:
    """Through the launcher: the step-2 tag of a 2-rank run gets ``zero -> <a real universal
    conversion whose every zero/<param>/ holds a payload file>``. DeepSpeed 0.19.8 treated it as
    universal and unpickled the payload (the marker appeared before this fix); now the trainer
    stops before building the engine, naming the link."""
    straight = straight_run("zero2.json")
    universal = checkpoint.to_universal(straight / "checkpoints" / "step_00000002", tmp_path / "converted")
    marker = tmp_path / "pwned"
    for param in (universal / "zero").iterdir():
        if param.is_dir():
            torch.save({"param": _Payload(marker)}, param / "evil.pt")
    run = tmp_path / "resumed"
    tag = Path(shutil.copytree(straight / "checkpoints" / "step_00000002", run / "checkpoints" / "step_00000002"))
    (tag / "zero").symlink_to(universal / "zero", target_is_directory=True)
    r = pretrain(run, launch_dataset, "zero2.json", "--resume", str(tag), check=False)
    assert not marker.exists()
    assert r.returncode != 0
    assert f"{tag / 'zero'}: a symbolic link inside the checkpoint (to {universal / 'zero'}); refusing to load it" \
        in r.stderr
    assert not (run / "metrics.jsonl").exists()


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
