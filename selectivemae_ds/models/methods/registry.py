"""The method registry: name -> `MethodSpec` instance.

A method module decorates its spec class with `@register`; importing
`selectivemae_ds.models.methods` imports the built-in modules, so every
built-in name is registered before any lookup.
"""
from __future__ import annotations

from typing import TypeVar

from selectivemae_ds.errors import ConfigError

from .base import MethodSpec

_REGISTRY: dict[str, MethodSpec] = {}
S = TypeVar("S", bound=type[MethodSpec])


def register(cls: S) -> S:
    """Class decorator: add one instance of `cls` under `cls.name` (a second spec with the same name is a bug)."""
    if cls.name in _REGISTRY:
        raise RuntimeError(f"method {cls.name!r} is registered twice ({type(_REGISTRY[cls.name]).__name__}, {cls.__name__})")
    _REGISTRY[cls.name] = cls()
    return cls


def get_spec(name: str) -> MethodSpec:
    """The spec registered as `name`; ConfigError naming `model.method` when there is none."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"model.method: unknown method {name!r} (choose from {', '.join(_REGISTRY)})") from None


def method_names() -> tuple[str, ...]:
    """Registered names, in registration order."""
    return tuple(_REGISTRY)
