"""Pretraining methods as registered specs (one module per method).

    from selectivemae_ds.models.methods import get_spec, method_names
    spec = get_spec("selectivemae")          # ConfigError naming model.method if unknown
    cfg = spec.default_config()              # the [selectivemae] section's dataclass

Adding a method is one new module in this package that defines its config
dataclass and a `MethodSpec` subclass decorated with `@register`, plus one
import line below (docs/model.md, "Adding a method in one file").
"""
from __future__ import annotations

# The built-in methods register themselves on import, in this order (the registry's order).
from . import selectivemae  # noqa: F401  isort: skip
from . import mae  # noqa: F401  isort: skip
from . import crossmae  # noqa: F401  isort: skip
from . import simmim  # noqa: F401  isort: skip
from . import ctxmim  # noqa: F401  isort: skip
from .base import MethodSpec, Selection, StepTensors
from .crossmae import CrossMAEConfig
from .ctxmim import CtxMIMConfig
from .mae import MAEConfig
from .registry import get_spec, method_names, register
from .selectivemae import SelectiveMAEConfig
from .simmim import SimMIMConfig

__all__ = [
    "CrossMAEConfig",
    "CtxMIMConfig",
    "MAEConfig",
    "MethodSpec",
    "Selection",
    "SelectiveMAEConfig",
    "SimMIMConfig",
    "StepTensors",
    "get_spec",
    "method_names",
    "register",
]
