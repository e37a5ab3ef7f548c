"""The experiment configuration: one TOML (+ ``--set a.b=v`` overrides) -> one validated TrainConfig.

Sections of the TOML map to dataclasses::

    run_dir = "runs/x"        # top-level key
    [model]      ModelConfig      (selectivemae_ds.models.config)
    [<method>]   the config of model.method, e.g. [selectivemae] SelectiveMAEConfig
                 (selectivemae_ds.models.methods; one section per registered method)
    [data]       DataConfig       (selectivemae_ds.data.config)
    [optim]      OptimConfig      (this module)
    [train]      TrainLoopConfig  (this module)
    [checkpoint] CheckpointConfig (this module)
    [debug]      DebugConfig      (this module; test-only fault injection, off by default)

Unknown keys are rejected naming the key; values are coerced to the dataclass field
types (``--set train.steps=10`` gives an int); every section is validated before any
work starts. ``data.img_size`` follows ``model.img_size`` unless the user sets it, in
which case the two must agree (there is one model input size).

Counting is in optimizer steps inside the code: ``train.epochs`` and
``optim.warmup_epochs`` are user-facing units converted once by :func:`resolve_steps`
when the dataset size is known, and the resolved config (with steps filled in) is what
gets written into the run dir and the checkpoints.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from selectivemae_ds.atomic import atomic_write_text
from selectivemae_ds.data import order
from selectivemae_ds.data.config import DataConfig
from selectivemae_ds.errors import ConfigError
from selectivemae_ds.models.config import ModelConfig
from selectivemae_ds.models.methods import get_spec, method_names

RESOLVED_NAME = "config.toml"
# Largest train.seed: TOML integers are signed 64-bit, and SeedSequence takes any value >= 0.
MAX_SEED = 2**63 - 1


@dataclass
class OptimConfig:
    """The ``[optim]`` section: AdamW and the learning-rate schedule."""

    blr: float = 1.5e-4
    """Base learning rate (MAE rule): lr = blr * train.global_batch / 256, times
    the method's ratio when ``scale_by_decode`` is on (see ``scale_by_decode``)."""
    lr: float = 0.0
    """Absolute peak learning rate; > 0 replaces the blr rule entirely."""
    scale_by_decode: bool = True
    """Scale the lr by the method's ratio: decode_ratio / mask_ratio for selectivemae
    (paper: 0.25 / 0.85) and crossmae (its main_pretrain.py: 0.25 / 0.75); 1 for mae."""
    min_lr: float = 0.0
    """Floor of the cosine decay."""
    warmup_steps: int = -1
    """Linear warmup length in optimizer steps; -1 means use ``warmup_epochs``."""
    warmup_epochs: float = 40.0
    """Linear warmup in epochs, converted to steps once (MAE and CrossMAE: 40 of 800; the
    SelectiveMAE paper: 60 of 800, its Table 9, set in its recipe configs)."""
    beta1: float = 0.9
    """AdamW beta1 (MAE: 0.9)."""
    beta2: float = 0.95
    """AdamW beta2 (MAE: 0.95)."""
    eps: float = 1e-8
    """AdamW epsilon."""
    weight_decay: float = 0.05
    """Decoupled weight decay on matrices (cls/mask tokens included, as MAE); norms and biases
    get none (position tables are fixed buffers)."""
    grad_clip: float | None = None
    """Global gradient-norm clip (DeepSpeed ``gradient_clipping``); 0 disables clipping; unset
    (None) means the method's recipe: 0 for mae and crossmae (their code does not clip), 1.0
    for selectivemae (a deviation from its public code, see docs/model.md). The resolved
    config records the number."""

    def validate(self) -> None:
        """Raise ConfigError naming the offending ``optim.*`` key."""
        if not self.blr > 0.0:
            raise ConfigError(f"optim.blr: must be > 0, got {self.blr}")
        if self.lr < 0.0:
            raise ConfigError(f"optim.lr: must be >= 0 (0 = use the blr rule), got {self.lr}")
        if self.min_lr < 0.0:
            raise ConfigError(f"optim.min_lr: must be >= 0, got {self.min_lr}")
        if self.warmup_steps < -1:
            raise ConfigError(f"optim.warmup_steps: must be >= 0 or -1 (use warmup_epochs), got {self.warmup_steps}")
        if self.warmup_epochs < 0.0:
            raise ConfigError(f"optim.warmup_epochs: must be >= 0, got {self.warmup_epochs}")
        for key in ("beta1", "beta2"):
            value = getattr(self, key)
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"optim.{key}: must be in [0, 1), got {value}")
        if not self.eps > 0.0:
            raise ConfigError(f"optim.eps: must be > 0, got {self.eps}")
        if self.weight_decay < 0.0:
            raise ConfigError(f"optim.weight_decay: must be >= 0, got {self.weight_decay}")
        if self.grad_clip is not None and self.grad_clip < 0.0:
            raise ConfigError(f"optim.grad_clip: must be >= 0 (0 disables), got {self.grad_clip}")


@dataclass
class TrainLoopConfig:
    """The ``[train]`` section: length, batch geometry, seeds and logging cadence."""

    steps: int = 0
    """Total optimizer steps; 0 means use ``epochs``."""
    epochs: float = 0.0
    """Total epochs (paper: 800), converted once to steps from the dataset size."""
    global_batch: int = field(default=1024, metadata={"resume": "fixed"})
    """Images per optimizer step over all ranks (paper: 1024)."""
    micro_batch: int = 64
    """Images per forward/backward on one rank; the rest is gradient accumulation."""
    seed: int = field(default=0, metadata={"resume": "fixed"})
    """Seed of the data order and of the per-step model randomness."""
    log_every: int = 10
    """Optimizer steps between log lines (console, JSONL, TensorBoard)."""
    picture_every: int = 500
    """Optimizer steps between reconstruction pictures in TensorBoard; 0 disables them."""
    max_nonfinite: int = 5
    """Consecutive non-finite steps tolerated before rolling back to the last checkpoint
    (once), then stopping with an error."""
    peak_tflops: float = 0.0
    """Peak dense bf16 TFLOP/s of one accelerator for MFU; 0 = look it up from the device
    name (A100/H100/H200), MFU is reported as null when unknown (e.g. CPU)."""
    checkpoint_on_preempt: bool = True
    """On SIGTERM/SIGINT, write a checkpoint after the step the ranks agree to stop at
    (when that step has none yet), then exit 128 + the signal number."""
    collective_timeout_s: float = 300.0
    """Seconds a rank waits in a collective (all_reduce, barrier) for its peers before the
    run stops with a run error naming the rank and the collective; the backend's own
    default (30 minutes) is far too long for a hung or stopped peer."""

    def validate(self) -> None:
        """Raise ConfigError naming the offending ``train.*`` key."""
        if self.steps < 0:
            raise ConfigError(f"train.steps: must be >= 0, got {self.steps}")
        if self.epochs < 0.0:
            raise ConfigError(f"train.epochs: must be >= 0, got {self.epochs}")
        if self.steps == 0 and self.epochs == 0.0:
            raise ConfigError("train.steps: set train.steps or train.epochs (both are 0)")
        if self.steps > 0 and self.epochs > 0.0:
            raise ConfigError(f"train.steps: set train.steps ({self.steps}) or train.epochs ({self.epochs}), not both")
        if self.global_batch < 1:
            raise ConfigError(f"train.global_batch: must be >= 1, got {self.global_batch}")
        if self.micro_batch < 1:
            raise ConfigError(f"train.micro_batch: must be >= 1, got {self.micro_batch}")
        if self.global_batch % self.micro_batch != 0:
            raise ConfigError(
                f"train.global_batch: {self.global_batch} is not a multiple of train.micro_batch ({self.micro_batch})"
            )
        if self.log_every < 1:
            raise ConfigError(f"train.log_every: must be >= 1, got {self.log_every}")
        if self.picture_every < 0:
            raise ConfigError(f"train.picture_every: must be >= 0 (0 disables), got {self.picture_every}")
        if self.max_nonfinite < 1:
            raise ConfigError(f"train.max_nonfinite: must be >= 1, got {self.max_nonfinite}")
        if self.peak_tflops < 0.0:
            raise ConfigError(f"train.peak_tflops: must be >= 0, got {self.peak_tflops}")
        if not 0 <= self.seed <= MAX_SEED:
            raise ConfigError(f"train.seed: must be an integer in [0, 2**63 - 1], got {self.seed}")
        if not self.collective_timeout_s > 0.0:
            raise ConfigError(f"train.collective_timeout_s: must be > 0, got {self.collective_timeout_s}")

    def check_world_size(self, world_size: int) -> int:
        """Gradient-accumulation steps for ``world_size`` ranks; ConfigError if the batch does not split."""
        per_step = world_size * self.micro_batch
        if self.global_batch % per_step != 0:
            raise ConfigError(
                f"train.global_batch: {self.global_batch} is not a multiple of "
                f"train.micro_batch ({self.micro_batch}) x {world_size} ranks"
            )
        return self.global_batch // per_step


@dataclass
class CheckpointConfig:
    """The ``[checkpoint]`` section: DeepSpeed sharded checkpoints under ``run_dir/checkpoints``."""

    every_steps: int = 1000
    """Optimizer steps between checkpoints (one is always written at the end); 0 = only at the end."""
    keep: int = 3
    """Complete checkpoints kept; older ones are deleted after a newer one is complete."""
    resume: str = ""
    """"" = fresh start, "auto" = newest complete checkpoint of this run_dir (fresh if none),
    or a path to a checkpoint tag directory (also a universal one, see docs/training.md)."""

    def validate(self, check_path: bool = True) -> None:
        """Raise ConfigError naming the offending ``checkpoint.*`` key (``check_path``: that a
        resume path exists)."""
        if self.every_steps < 0:
            raise ConfigError(f"checkpoint.every_steps: must be >= 0, got {self.every_steps}")
        if self.keep < 1:
            raise ConfigError(f"checkpoint.keep: must be >= 1, got {self.keep}")
        if check_path and self.resume not in ("", "auto") and not Path(self.resume).is_dir():
            raise ConfigError(f"checkpoint.resume: {self.resume} is neither \"auto\" nor a checkpoint directory")


@dataclass
class DebugConfig:
    """The ``[debug]`` section: fault injection for tests and drills only, off by default.

    Never set in a real run: these keys make training fail on purpose."""

    nonfinite_at: list[int] = field(default_factory=list)
    """0-based optimizer steps whose loss is multiplied by ``nonfinite_value``."""
    nonfinite_grad_at: list[int] = field(default_factory=list)
    """0-based optimizer steps where one parameter's gradient (the first trainable one) is
    replaced by ``nonfinite_value`` during backward while the loss stays finite."""
    nonfinite_value: str = "nan"
    """The value ``nonfinite_at`` and ``nonfinite_grad_at`` inject, "nan" or "inf"."""
    checkpoint_delay_s: float = 0.0
    """Seconds every rank sleeps between writing its checkpoint shards and the COMPLETE
    marker, so a test can kill a rank inside the write window."""

    def validate(self) -> None:
        """Raise ConfigError naming the offending ``debug.*`` key."""
        for key in ("nonfinite_at", "nonfinite_grad_at"):
            steps = getattr(self, key)
            if any(s < 0 for s in steps):
                raise ConfigError(f"debug.{key}: fault-injection steps are 0-based optimizer steps >= 0, got {steps}")
        if self.nonfinite_value not in ("nan", "inf"):
            raise ConfigError(f'debug.nonfinite_value: must be "nan" or "inf", got {self.nonfinite_value!r}')
        if self.checkpoint_delay_s < 0.0:
            raise ConfigError(f"debug.checkpoint_delay_s: must be >= 0, got {self.checkpoint_delay_s}")


# Keys that left their section: where they went (checked by build_config).
MOVED_KEYS = {
    "train.nonfinite_at": "debug.nonfinite_at",
    "train.nonfinite_grad_at": "debug.nonfinite_grad_at",
    "train.nonfinite_value": "debug.nonfinite_value",
}


def check_moved(key: str) -> None:
    """ConfigError for a key that moved to another section, saying where to."""
    if key in MOVED_KEYS:
        raise ConfigError(f"{key}: moved to {MOVED_KEYS[key]} (test-only fault injection lives in the "
                          "[debug] section, see docs/training.md)")


@dataclass
class TrainConfig:
    """The root of the experiment configuration."""

    run_dir: str = ""
    """Output directory: resolved config, checkpoints/, tensorboard/, metrics.jsonl."""
    model: ModelConfig = field(default_factory=ModelConfig)
    method_cfg: Any = field(default_factory=lambda: get_spec(ModelConfig().method).default_config())
    """The config of ``model.method`` (its own TOML section, named after the method)."""
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)

    def validate(self, check_paths: bool = True) -> None:
        """Validate every section and the cross-section rules; ConfigError names the key.

        ``check_paths=False`` skips the existence checks of ``data.path`` and
        ``checkpoint.resume`` (a resolved config read where those paths need not exist)."""
        if not self.run_dir:
            raise ConfigError("run_dir: no output directory given")
        self.model.validate()
        get_spec(self.model.method).validate(self.method_cfg, self.model)
        self.data.validate(check_path=check_paths)
        if self.data.img_size != self.model.img_size:
            raise ConfigError(
                f"data.img_size: {self.data.img_size} differs from model.img_size ({self.model.img_size}); "
                "leave data.img_size unset to follow the model"
            )
        self.optim.validate()
        self.train.validate()
        self.checkpoint.validate(check_path=check_paths)
        self.debug.validate()

    @property
    def checkpoint_dir(self) -> Path:
        """Where the checkpoint tags live."""
        return Path(self.run_dir) / "checkpoints"


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "optim": OptimConfig,
    "train": TrainLoopConfig,
    "checkpoint": CheckpointConfig,
    "debug": DebugConfig,
}


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Convert a TOML value or a ``--set`` string to the field type ``hint``; ConfigError names ``key``."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        non_none = [a for a in args if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _coerce(key, value, non_none[0])
    if origin in (list, tuple):
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                value = json.loads(text)
            else:
                value = [v for v in text.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        if origin is tuple:
            item_types = [args[0]] * len(value) if (len(args) == 2 and args[1] is Ellipsis) else list(args)
            if len(item_types) != len(value):
                raise ConfigError(f"{key}: expected {len(item_types)} values, got {value!r}")
            return tuple(_coerce(key, v, t) for v, t in zip(value, item_types))
        return [_coerce(key, v, args[0] if args else str) for v in value]
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if hint in (int, float):
        # int fields take ints (or their text); float fields also take ints. bool is an int
        # subclass in Python but never a number here.
        what = "an integer" if hint is int else "a number"
        accepted = (int,) if hint is int else (int, float)
        if isinstance(value, accepted) and not isinstance(value, bool):
            return hint(value)
        if isinstance(value, str):
            try:
                return hint(value)
            except ValueError as e:
                raise ConfigError(f"{key}: expected {what}, got {value!r}") from e
        raise ConfigError(f"{key}: expected {what}, got {value!r}")
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported field type {hint!r}")


def _apply(obj: Any, prefix: str, values: dict[str, Any]) -> None:
    """Set ``values`` on the dataclass ``obj`` (coerced), rejecting unknown keys."""
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for name, value in values.items():
        key = f"{prefix}{name}"
        check_moved(key)
        if name not in names:
            raise ConfigError(f"{key}: unknown key (known: {', '.join(sorted(names))})")
        setattr(obj, name, _coerce(key, value, hints[name]))


def _parse_override(text: str) -> tuple[str, str]:
    """Split ``a.b=v`` into (``a.b``, ``v``)."""
    if "=" not in text:
        raise ConfigError(f"--set {text}: expected key=value, e.g. train.steps=100")
    key, value = text.split("=", 1)
    return key.strip(), value.strip()


# Where each key of the old [masking] section went when it was split per method.
LEGACY_MASKING: dict[str, tuple[str, ...]] = {
    "mask_ratio": ("selectivemae.mask_ratio",),
    "decode_ratio": ("selectivemae.decode_ratio", "crossmae.decode_ratio"),
    "mae_mask_ratio": ("mae.mask_ratio", "crossmae.mask_ratio"),
    "init_select": ("selectivemae.init_select",),
    "temperature": ("selectivemae.init_temperature",),
    "near_until": ("selectivemae.near_until",),
    "far_until": ("selectivemae.far_until",),
    "blend": ("selectivemae.blend",),
    "hog_bins": ("selectivemae.hog_bins",),
}


def _legacy_masking(keys: list[str]) -> ConfigError:
    """The error for keys of the removed [masking] section, saying what to write instead."""
    renames = "; ".join(
        f"masking.{k} -> {' or '.join(LEGACY_MASKING[k])}" if k in LEGACY_MASKING else f"masking.{k}: no longer exists"
        for k in keys
    )
    return ConfigError(f"masking: the [masking] section was split into one section per method ([selectivemae], "
                       f"[mae], [crossmae]); rename {renames}")


def _method_name(table: dict[str, Any], overrides: list[tuple[str, str]]) -> str:
    """model.method as the TOML and the overrides set it (the last override wins)."""
    name = ModelConfig().method
    model = table.get("model")
    if isinstance(model, dict) and "method" in model:
        name = _coerce("model.method", model["method"], str)
    for key, value in overrides:
        if key == "model.method":
            name = value
    return name


def _section(cfg: TrainConfig, name: str, method: str, others: dict[str, Any]) -> Any:
    """The dataclass a [name] table or `name.key` override goes into.

    A section of a method other than ``model.method`` goes into ``others`` (checked,
    not used), so one experiment file can carry settings for several methods.
    """
    if name in SECTIONS:
        return getattr(cfg, name)
    if name == method:
        return cfg.method_cfg
    return others.setdefault(name, get_spec(name).default_config())


def build_config(table: dict[str, Any], overrides: list[str] | None = None, *,
                 check_paths: bool = True) -> TrainConfig:
    """Build and validate a TrainConfig from a parsed TOML table and ``--set`` overrides
    (``check_paths``: see :meth:`TrainConfig.validate`)."""
    parsed = [_parse_override(text) for text in overrides or []]
    method = _method_name(table, parsed)
    cfg = TrainConfig(method_cfg=get_spec(method).default_config())
    sections = (*SECTIONS, *method_names())
    others: dict[str, Any] = {}
    user_keys: set[str] = set()
    for name, value in table.items():
        if name == "run_dir":
            cfg.run_dir = _coerce("run_dir", value, str)
        elif name == "masking":
            raise _legacy_masking(list(value) if isinstance(value, dict) else [])
        elif name in sections:
            if not isinstance(value, dict):
                raise ConfigError(f"{name}: expected a [{name}] table, got {value!r}")
            _apply(_section(cfg, name, method, others), f"{name}.", value)
            user_keys.update(f"{name}.{k}" for k in value)
        else:
            raise ConfigError(f"{name}: unknown key (known: run_dir, {', '.join(sections)})")
    for key, value in parsed:
        if key == "run_dir":
            cfg.run_dir = value
            continue
        section, _, name = key.partition(".")
        if section == "masking":
            raise _legacy_masking([name])
        if section not in sections or not name:
            raise ConfigError(f"{key}: unknown key (sections: run_dir, {', '.join(sections)})")
        _apply(_section(cfg, section, method, others), f"{section}.", {name: value})
        user_keys.add(key)
    if "data.img_size" not in user_keys:
        cfg.data.img_size = cfg.model.img_size
    for name, unused in others.items():
        get_spec(name).check(unused)
    if cfg.optim.grad_clip is None:
        cfg.optim.grad_clip = get_spec(method).default_grad_clip
    cfg.validate(check_paths=check_paths)
    return cfg


def load_config(path: str | os.PathLike[str] | None, overrides: list[str] | None = None) -> TrainConfig:
    """Read an experiment TOML (or none: all defaults), apply ``--set`` overrides, validate."""
    table = read_toml(path) if path is not None else {}
    return build_config(table, overrides)


def read_toml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The parsed TOML file ``path``; ConfigError naming it when it is missing or not TOML."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError as e:
        raise ConfigError(f"{path}: no such config file") from e
    except IsADirectoryError as e:
        raise ConfigError(f"{path}: is a directory, not a TOML config file") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from e


def load_resolved(source: dict[str, Any] | str | os.PathLike[str]) -> TrainConfig:
    """A resolved config (a checkpoint's ``client_state["config"]`` or a ``config.toml`` path)
    as a validated TrainConfig: the one way every reader (export, visualize) rebuilds it.

    It goes through :func:`build_config`, so an unknown or moved key is a ConfigError naming
    it. The paths it holds (``data.path``, ``checkpoint.resume``) need not exist: the reader
    may run on another machine than the training did.
    """
    if isinstance(source, dict):
        table, where = source, "the checkpoint's resolved config"
    elif isinstance(source, (str, os.PathLike)):
        table, where = read_toml(source), str(source)
    else:
        raise ConfigError(f"no resolved training config (got {type(source).__name__})")
    if not isinstance(table.get("model"), dict):
        raise ConfigError(f"{where}: not a resolved training config (no [model] section)")
    return build_config(table, check_paths=False)


def fixed_on_resume() -> tuple[str, ...]:
    """Keys (``section.name``) a resume must keep: the fields whose dataclass metadata says
    ``{"resume": "fixed"}`` (they fix the parameter shapes or the sample stream).

    Derived from the config classes, so a new field is covered by marking it where it is
    declared; every other key (logging, lr, paths, run length) may change on resume.
    """
    keys: list[str] = []
    sections = {**SECTIONS, **{name: get_spec(name).config_cls for name in method_names()}}
    for name, section in sections.items():
        for f in dataclasses.fields(section):
            mark = f.metadata.get("resume")
            if mark is None:
                continue
            if mark != "fixed":
                raise TypeError(f'{name}.{f.name}: resume metadata must be "fixed", got {mark!r}')
            keys.append(f"{name}.{f.name}")
    return tuple(keys)


def config_to_dict(cfg: TrainConfig) -> dict[str, Any]:
    """The config as nested plain data (tuples become lists), ready for JSON or TOML.

    The method's config appears under the method's name, after ``model``, as in the TOML.
    """
    data = json.loads(json.dumps(dataclasses.asdict(cfg)))
    method_values = data.pop("method_cfg")
    out: dict[str, Any] = {}
    for key, value in data.items():
        out[key] = value
        if key == "model":
            out[cfg.model.method] = method_values
    return out


def resolve_steps(cfg: TrainConfig, dataset_len: int) -> TrainConfig:
    """Return a copy with ``train.steps`` and ``optim.warmup_steps`` in steps (epochs converted
    once) for a dataset of ``dataset_len`` records."""
    steps_per_epoch = order.steps_per_epoch(dataset_len, cfg.train.global_batch)
    out = dataclasses.replace(
        cfg, train=dataclasses.replace(cfg.train), optim=dataclasses.replace(cfg.optim)
    )
    if out.train.steps == 0:
        out.train.steps = max(1, math.ceil(out.train.epochs * steps_per_epoch))
        out.train.epochs = 0.0
    if out.optim.warmup_steps < 0:
        out.optim.warmup_steps = int(round(out.optim.warmup_epochs * steps_per_epoch))
    out.optim.warmup_steps = min(out.optim.warmup_steps, out.train.steps)
    return out


def _toml_value(value: Any) -> str:
    """Render one TOML value (str, bool, int, float, list)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def to_toml(cfg: TrainConfig) -> str:
    """The config as TOML text that :func:`load_config` reads back (None fields are omitted = default)."""
    data = config_to_dict(cfg)
    lines = [f"run_dir = {_toml_value(data.pop('run_dir'))}"]
    for section, values in data.items():
        lines.append(f"\n[{section}]")
        lines.extend(f"{k} = {_toml_value(v)}" for k, v in values.items() if v is not None)
    return "\n".join(lines) + "\n"


def write_resolved(cfg: TrainConfig, run_dir: str | os.PathLike[str]) -> Path:
    """Write the resolved config into ``run_dir/config.toml`` atomically and return its path."""
    path = Path(run_dir) / RESOLVED_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(path, to_toml(cfg))
