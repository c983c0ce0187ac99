"""Method registry and the result type every explainer returns.

A method is one module in :mod:`vitlens.methods` that registers a function::

    @register("tis", kind=MethodKind.PERTURBATION, token_level=True, needs=(Capability.TOKEN_SUBSETS,),
              auto_score=PROB_OR_SIMILARITY, description="...")
    def tis(adapter, x, target=None, *, seed=0, batch_size=None, progress=None, **params) -> MethodResult:

``adapter`` is a :class:`vitlens.models.ViTAdapter`, ``x`` a validated (B, 3, H, W) batch on the
model's device, ``target`` the user's target (resolve it with ``adapter.resolve_target``; pass the
clean outputs if the method computes them anyway, to avoid a second forward pass). The function
returns raw (unnormalised) maps; :func:`vitlens.explain` normalises and upsamples them.

What is declared at registration and checked there (a bad declaration fails at import):

* ``kind`` (:class:`MethodKind`): how the method probes the model; :func:`vitlens.explain` reads
  :attr:`MethodKind.perturbs_inputs` to decide where a ``precision=`` autocast applies;
* ``needs``: the adapter capabilities (:class:`~vitlens.models.capabilities.Capability`) the method
  cannot run without; :func:`vitlens.explain` checks them first and refuses in one line;
* ``auto_score``: what ``score="auto"`` resolves to (:class:`~vitlens.models.targets.AutoScore`), or
  ``None`` for methods without a ``score`` parameter;
* ``renamed``: parameter names of earlier releases and their new names (``{"start_layer": "layers"}``),
  so that an old name gets a one-line error naming the new one; ``old_values``: values a parameter no
  longer takes and what replaces them (``{"layers": {"paper": 0.4}}``), likewise.

Parameters are the keyword-only arguments with defaults, minus the runtime arguments
(:data:`vitlens.registry.METHOD_RUNTIME`); their type hints (``typing.Literal`` for choices) are what
:mod:`vitlens._params` converts and checks.
"""
from __future__ import annotations

import enum
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from torch import Tensor

from ..models.capabilities import Capability
from ..models.targets import AutoScore, Target
from ..registry import METHOD_RUNTIME, Registry, RegistryError, keyword_defaults


class MethodKind(str, enum.Enum):
    """How a method probes the model."""

    ATTENTION = "attention"        # reads attention probabilities (no gradient)
    GRADIENT = "gradient"          # gradients of the target score (attention, tokens or pixels)
    PERTURBATION = "perturbation"  # forward passes of perturbed inputs or token subsets
    RELEVANCE = "relevance"        # relevance propagation (the LRP family)

    @property
    def perturbs_inputs(self) -> bool:
        """Whether the method's cost is forward passes of perturbed inputs: a ``precision=`` autocast then
        applies to those passes only (:mod:`vitlens.precision`), never to the whole method."""
        return self is MethodKind.PERTURBATION

    def __str__(self) -> str:
        return self.value


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
    """A registered method and its declared metadata (see the module docstring)."""

    name: str
    fn: Callable[..., MethodResult]
    kind: MethodKind
    token_level: bool
    description: str
    defaults: dict
    needs: tuple[Capability, ...] = ()
    auto_score: Optional[AutoScore] = None
    renamed: dict[str, str] = field(default_factory=dict)
    old_values: dict[str, dict] = field(default_factory=dict)

    def check(self, adapter, params: dict) -> dict:
        """``params`` converted to the declared types and checked (unknown or old names, choices), and the
        model checked for :attr:`needs`; one-line errors naming the problem."""
        from .._params import convert_params

        params = convert_params(self.fn, params, self.defaults, owner=f"method '{self.name}'", flag=None,
                                objects_ok=True, renamed=self.renamed, old_values=self.old_values)
        adapter.require_all(self.needs, self.name)
        return params

    def __call__(self, adapter, x: Tensor, target=None, **kwargs) -> MethodResult:
        """Run the method on a validated batch: its parameters are checked (:meth:`check`) first."""
        runtime = {k: kwargs.pop(k) for k in METHOD_RUNTIME if k in kwargs}
        return self.fn(adapter, x, target, **runtime, **self.check(adapter, kwargs))

    @property
    def params(self) -> dict:
        """The method's parameters and their defaults (alias of :attr:`defaults`)."""
        return self.defaults


REGISTRY: Registry[MethodInfo] = Registry("method", "vitlens.methods")


def register(name: str, *, kind: MethodKind | str, token_level: bool, description: str,
             needs: tuple[Capability | str, ...] = (), auto_score: Optional[AutoScore] = None,
             renamed: Optional[dict[str, str]] = None, old_values: Optional[dict[str, dict]] = None):
    """Decorator adding an explainer function to the registry under ``name`` (see the module docstring)."""

    def deco(fn: Callable[..., MethodResult]) -> Callable[..., MethodResult]:
        sig = inspect.signature(fn)
        missing = [k for k in METHOD_RUNTIME if k not in sig.parameters]
        if missing:
            raise RegistryError(f"method '{name}' must accept the runtime arguments {', '.join(missing)}.")
        try:
            k = MethodKind(kind)
        except ValueError:
            raise RegistryError(f"method '{name}': kind {kind!r} is not one of "
                                f"{', '.join(m.value for m in MethodKind)}.") from None
        try:
            caps = tuple(Capability(c) for c in needs)
        except ValueError:
            raise RegistryError(f"method '{name}': needs {needs!r} names no capability (one of "
                                f"{', '.join(c.value for c in Capability)}).") from None
        has_score = "score" in sig.parameters
        if has_score != (auto_score is not None):
            raise RegistryError(f"method '{name}': declare auto_score exactly when the method has a 'score' "
                                "parameter.")
        defaults = keyword_defaults(fn, skip=METHOD_RUNTIME)
        clash = set(renamed or {}) & set(defaults)
        if clash:
            raise RegistryError(f"method '{name}': renamed parameter(s) {sorted(clash)} still exist.")
        unknown = set(old_values or {}) - set(defaults)
        if unknown:
            raise RegistryError(f"method '{name}': old_values names unknown parameter(s) {sorted(unknown)}.")
        REGISTRY.add(MethodInfo(name, fn, k, bool(token_level), description, defaults, caps, auto_score,
                                dict(renamed or {}), dict(old_values or {})))
        return fn

    return deco


def get_method(name: str) -> MethodInfo:
    """The registered method ``name`` (:class:`~vitlens.errors.UnknownMethodError` with close matches)."""
    return REGISTRY.get(name)


def method_names() -> list[str]:
    """Sorted names of the registered methods."""
    return REGISTRY.names()


def method_infos() -> list[MethodInfo]:
    """Every registered method, sorted by name."""
    return REGISTRY.entries()
