"""Method registry and the result type every explainer returns.

A method is one module in :mod:`vitlens.methods` that registers a function::

    @register("tis", kind="perturbation", token_level=True, description="...")
    def tis(adapter, x, target, *, seed=0, batch_size=None, progress=None, **params) -> MethodResult:

``adapter`` is a :class:`vitlens.models.ViTAdapter`, ``x`` a validated (B, 3, H, W) batch on the
model's device, ``target`` the user's target (resolve it with ``adapter.resolve_target``; pass the
clean outputs if the method computes them anyway, to avoid a second forward pass). The function
returns raw (unnormalised) maps; :func:`vitlens.explain` normalises and upsamples them.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from torch import Tensor

from ..errors import UnknownMethodError
from ..models.targets import Target


@dataclass
class MethodResult:
    """Raw output of a method: token-level maps (B, gh, gw) and/or pixel maps (B, H, W)."""

    target: Target
    token_maps: Optional[Tensor] = None
    maps: Optional[Tensor] = None
    outputs: Optional[Tensor] = None  # clean model outputs, when the method computed them
    extras: dict[str, Any] = field(default_factory=dict)


@dataclass
class MethodInfo:
    name: str
    fn: Callable[..., MethodResult]
    kind: str
    token_level: bool
    description: str
    defaults: dict

    def __call__(self, *args, **kwargs) -> MethodResult:
        return self.fn(*args, **kwargs)


_REGISTRY: dict[str, MethodInfo] = {}


def register(name: str, *, kind: str, token_level: bool, description: str):
    """Decorator adding an explainer function to the registry under ``name``."""

    def deco(fn: Callable[..., MethodResult]) -> Callable[..., MethodResult]:
        sig = inspect.signature(fn)
        defaults = {k: p.default for k, p in sig.parameters.items()
                    if p.default is not inspect.Parameter.empty and p.kind == p.KEYWORD_ONLY}
        _REGISTRY[name] = MethodInfo(name, fn, kind, token_level, description, defaults)
        return fn

    return deco


def get_method(name: str) -> MethodInfo:
    from . import _discover

    _discover()
    if name not in _REGISTRY:
        from ..errors import did_you_mean

        raise UnknownMethodError(f"unknown method '{name}'.{did_you_mean(name, _REGISTRY)} "
                                 f"The available methods: {', '.join(sorted(_REGISTRY))}.")
    return _REGISTRY[name]


def method_names() -> list[str]:
    from . import _discover

    _discover()
    return sorted(_REGISTRY)


def method_infos() -> list[MethodInfo]:
    from . import _discover

    _discover()
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]
