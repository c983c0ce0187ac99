"""Metric registry, the result type every metric returns, and shared input checks.

A metric is a function registered with :func:`register_metric`::

    @register_metric("insertion", higher_is_better=True)
    def insertion(model, x, maps, targets=None, *, <protocol kwargs with defaults>,
                  batch_size=None, progress=None) -> MetricResult:

``model`` is a :class:`vitlens.ViTAdapter` (or a module :func:`vitlens.wrap_model` accepts), ``x`` a
(B, 3, H, W) batch in the model's normalised space, ``maps`` (B, H, W) saliency maps at input
resolution, ``targets`` anything :meth:`ViTAdapter.resolve_target` accepts (``None``: the predicted
class). Metrics that need ground truth declare it in ``needs`` (e.g. ``("boxes",)``) and take it as a
keyword argument of that name.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from ..errors import InputError, UnknownMethodError

#: keyword arguments of every metric that are not part of its protocol
RUNTIME_KWARGS = ("batch_size", "progress", "precision", "compile")


@dataclass
class MetricResult:
    """Per-image values of a metric.

    Attributes:
        values: (B,) float per image; NaN where the protocol excludes the image.
        curves: (B, n_points) per-image curve, for metrics that have one.
        xs: (n_points,) abscissa of the curves (fraction of pixels changed).
        protocol: the full protocol used, defaults filled in.
        extras: per-image quantities that dataset-level metrics accumulate (e.g. the intersections
            and unions of :func:`segmentation`), keyed by name, each with the batch first.
    """

    values: Tensor
    curves: Optional[Tensor] = None
    xs: Optional[Tensor] = None
    protocol: dict = field(default_factory=dict)
    extras: dict = field(default_factory=dict)

    def mean(self) -> float:
        """Mean over the images that are not excluded (NaN when all are)."""
        return float(self.values.float().nanmean())

    def __len__(self) -> int:
        return int(self.values.shape[0])


@dataclass
class MetricInfo:
    name: str
    fn: Callable[..., MetricResult]
    higher_is_better: bool
    needs: tuple[str, ...]
    defaults: dict
    description: str = ""

    def __call__(self, *args, **kwargs) -> MetricResult:
        return self.fn(*args, **kwargs)


_REGISTRY: dict[str, MetricInfo] = {}


def register_metric(name: str, *, higher_is_better: bool, needs: tuple[str, ...] = (),
                    defaults: Optional[dict] = None):
    """Decorator adding a metric function to the registry under ``name``.

    ``defaults`` (the protocol keyword arguments and their defaults) is read from the signature unless
    given (for registered variants such as ``perturbation_positive`` that fix an argument)."""

    def deco(fn: Callable[..., MetricResult]) -> Callable[..., MetricResult]:
        if defaults is None:
            sig = inspect.signature(fn)
            d = {k: p.default for k, p in sig.parameters.items()
                 if p.default is not inspect.Parameter.empty and p.kind == p.KEYWORD_ONLY
                 and k not in RUNTIME_KWARGS and k not in needs}
        else:
            d = dict(defaults)
        doc = (inspect.getdoc(fn) or "").split("\n", 1)[0]
        _REGISTRY[name] = MetricInfo(name, fn, higher_is_better, tuple(needs), d, doc)
        return fn

    return deco


def get_metric(name: str) -> MetricInfo:
    """The registered metric ``name`` (raises :class:`UnknownMethodError` naming the choices)."""
    _discover()
    if name not in _REGISTRY:
        from ..errors import did_you_mean

        raise UnknownMethodError(f"unknown metric '{name}'.{did_you_mean(name, _REGISTRY)} "
                                 f"The available metrics: {', '.join(sorted(_REGISTRY))}.")
    return _REGISTRY[name]


def available_metrics() -> list[str]:
    """Names of the registered metrics."""
    _discover()
    return sorted(_REGISTRY)


def _discover() -> None:
    import importlib

    importlib.import_module("vitlens.metrics")  # importing the package registers every metric


# ---------------------------------------------------------------------------------------------- helpers
def as_maps(maps: Any) -> Tensor:
    """Accept an :class:`vitlens.Explanation`, a tensor or an array of (B, H, W) (or (B, 1, H, W)) maps."""
    if hasattr(maps, "maps") and not isinstance(maps, Tensor):
        maps = maps.maps
    if not isinstance(maps, Tensor):
        maps = torch.as_tensor(maps)
    if maps.dim() == 4 and maps.shape[1] == 1:
        maps = maps[:, 0]
    if maps.dim() != 3:
        raise InputError(f"saliency maps must have shape (B, H, W); got {tuple(maps.shape)}.")
    return maps


def check_maps(maps: Any, x: Optional[Tensor] = None) -> Tensor:
    """Validated float (B, H, W) maps, matching ``x``'s batch and spatial size when given."""
    maps = as_maps(maps)
    if x is not None:
        B, _, H, W = x.shape
        if maps.shape != (B, H, W):
            raise InputError(f"maps {tuple(maps.shape)} do not match the images: expected ({B}, {H}, {W}) "
                             "(one map per image at input resolution; upsample token maps first).")
        maps = maps.to(x.device)
    maps = maps.float()
    if not torch.isfinite(maps).all():
        raise InputError("saliency maps contain NaN or infinite values.")
    return maps


def pixel_stats(adapter, x: Tensor) -> tuple[Tensor, Tensor]:
    """The model's normalisation mean and std as (1, 3, 1, 1) tensors on ``x``'s device."""
    mean = torch.as_tensor(adapter.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    std = torch.as_tensor(adapter.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return mean, std


def trapezoid(curves: Tensor, xs: Tensor) -> Tensor:
    """Trapezoid-rule area under each row of ``curves`` (B, n) over the abscissa ``xs`` (n,)."""
    xs = xs.to(curves)
    return ((curves[:, 1:] + curves[:, :-1]) * 0.5 * (xs[1:] - xs[:-1])).sum(1)
