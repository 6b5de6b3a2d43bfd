"""Verifier registry: a verifier kind name (``"math"``, ``"code"``) → a factory.

Modules that define verifiers register them with ``@register_verifier("kind")``; tasks name their
kind in ``register_task(..., verifier=kind)``. ``get_verifier(kind, **options)`` builds one.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any, Callable

from r1kit.errors import ConfigError
from r1kit.rewards.base import Verifier

_VERIFIERS: dict[str, Callable[..., Verifier]] = {}


def register_verifier(kind: str) -> Callable[[Callable[..., Verifier]], Callable[..., Verifier]]:
    """Register a verifier factory under ``kind``. Raises ValueError if the kind is taken."""

    def wrap(factory: Callable[..., Verifier]) -> Callable[..., Verifier]:
        if kind in _VERIFIERS:
            raise ValueError(f"verifier {kind!r} is already registered")
        _VERIFIERS[kind] = factory
        return factory

    return wrap


def get_verifier(kind: str, **options: Any) -> Verifier:
    """Build the verifier registered as ``kind``. Raises ConfigError listing known kinds."""
    import r1kit.rewards as pkg

    for mod in pkgutil.iter_modules(pkg.__path__):
        if mod.name not in ("base", "registry"):
            importlib.import_module(f"r1kit.rewards.{mod.name}")
    if kind not in _VERIFIERS:
        raise ConfigError(f"unknown verifier {kind!r}; known: {', '.join(sorted(_VERIFIERS))}")
    return _VERIFIERS[kind](**options)
