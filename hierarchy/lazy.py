"""Lazy re-exports for package ``__init__`` modules (PEP 562).

A package may re-export its public names without importing the modules that define them
until a name is used: ``import registry.errors`` (the CLI's help, the SDK) then stays free of
SQLAlchemy, torch and the like, while ``from registry import open_registry`` keeps working.

    __getattr__ = lazy_exports(__name__, {"open_registry": "registry.db", ...})
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from importlib import import_module
from typing import Any

__all__ = ["lazy_exports"]


def lazy_exports(package: str, exports: Mapping[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` that imports ``exports[name]`` (a module path) on first use."""

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(import_module(module), name)
        setattr(sys.modules[package], name, value)  # later lookups skip this function
        return value

    return __getattr__
