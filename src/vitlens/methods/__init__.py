"""Explanation methods, one module each; every module registers itself on import.

The registry (:data:`REGISTRY`, a :class:`vitlens.registry.Registry`) imports every public module of this
package the first time a method is looked up; ``get_method(name)`` gives a method's
:class:`MethodInfo` (kind, needs, ``score="auto"`` rule, parameters and defaults).
"""
from __future__ import annotations

from .base import REGISTRY, MethodInfo, MethodKind, MethodResult, get_method, method_infos, method_names, register

__all__ = ["REGISTRY", "MethodInfo", "MethodKind", "MethodResult", "get_method", "method_infos", "method_names",
           "register"]
