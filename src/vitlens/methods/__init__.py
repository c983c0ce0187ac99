"""Explanation methods, one module each; every module registers itself on import."""
from __future__ import annotations

import importlib
import pkgutil

from .base import MethodInfo, MethodResult, get_method, method_infos, method_names, register

_DISCOVERED = False


def _discover() -> None:
    """Import every method module of this package once (each registers its method)."""
    global _DISCOVERED
    if _DISCOVERED:
        return
    _DISCOVERED = True
    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_") and info.name != "base":
            importlib.import_module(f"{__name__}.{info.name}")


__all__ = ["MethodResult", "MethodInfo", "register", "get_method", "method_names", "method_infos"]
