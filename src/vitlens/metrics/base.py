"""Metric registry, the result type every metric returns, and shared input checks.

A metric is a function registered with :func:`register_metric`::

    @register_metric("insertion", higher_is_better=True, value_range=...)
    def insertion(model, x, maps, targets=None, *, <protocol kwargs with defaults>,
                  batch_size=None, progress=None) -> MetricResult:

``model`` is a :class:`vitlens.ViTAdapter` (or a module :func:`vitlens.wrap_model` accepts), ``x`` a
(B, 3, H, W) batch in the model's normalised space, ``maps`` (B, H, W) saliency maps at input
resolution, ``targets`` anything :meth:`ViTAdapter.resolve_target` accepts (``None``: the predicted
class). Metrics that need ground truth declare it in ``needs`` (e.g. ``("boxes",)``) and take it as a
keyword argument of that name.
"""
from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from ..errors import InputError
from ..registry import METRIC_RUNTIME, Registry, RegistryError, keyword_defaults

#: keyword arguments of every metric that are not part of its protocol
RUNTIME_KWARGS = METRIC_RUNTIME


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


@dataclass(frozen=True)
class ValueRange:
    """The range of a metric's per-image values: ``lo``/``hi`` (``None``: unbounded) and whether the values
    are binary (0/1 hits, so that a proportion's interval applies)."""

    lo: Optional[float] = None
    hi: Optional[float] = None
    binary: bool = False


#: the per-image values lie in [0, 1]
UNIT = ValueRange(0.0, 1.0)
#: unbounded values
UNBOUNDED = ValueRange()

#: a pooled (dataset-level) score: per-image ``counts`` (n, k), each image's target (n,) and value (n,) ->
#: named numbers (e.g. ``{"mIoU": ...}``), as the papers report them
Pooling = Callable[[np.ndarray, Sequence[int], Sequence[float]], dict]


@dataclass
class MetricInfo:
    """A registered metric and its declared metadata (see :func:`register_metric`)."""

    name: str
    fn: Callable[..., MetricResult]
    higher_is_better: bool
    needs: tuple[str, ...]
    defaults: dict
    description: str = ""
    value_range: Callable[[dict], ValueRange] = lambda protocol: UNBOUNDED
    pooled: Optional[Pooling] = None

    def check(self, params: dict) -> dict:
        """Protocol keyword arguments converted to their declared types and checked (names, choices); the
        per-image data (``needs``), runtime arguments and objects pass unchanged. One-line errors."""
        from .._params import convert_params

        protocol = {k: v for k, v in params.items() if k in self.defaults}
        rest = {k: v for k, v in params.items() if k not in self.defaults}
        from ..registry import METRIC_RUNTIME

        unknown = {k: v for k, v in rest.items()
                   if k not in METRIC_RUNTIME and k not in self.needs and k not in _accepted(self.fn)}
        convert_params(self.fn, unknown, self.defaults, owner=f"metric '{self.name}'", flag=None)  # raises
        return {**rest, **convert_params(self.fn, protocol, self.defaults, owner=f"metric '{self.name}'", flag=None,
                                         objects_ok=True)}

    def __call__(self, *args, **kwargs) -> MetricResult:
        """Evaluate the metric; its protocol arguments are checked first (:meth:`check`)."""
        return self.fn(*args, **self.check(kwargs))

    @property
    def per_image(self) -> bool:
        """Whether the published number is the mean of the per-image values (else it is :attr:`pooled`)."""
        return self.pooled is None

    def range_for(self, protocol: Optional[dict] = None) -> ValueRange:
        """The :class:`ValueRange` of the values under ``protocol`` (defaults filled in)."""
        return self.value_range({**self.defaults, **(protocol or {})})


def _accepted(fn: Callable) -> set:
    return set(inspect.signature(fn).parameters)


REGISTRY: Registry[MetricInfo] = Registry("metric", "vitlens.metrics")


def register_metric(name: str, *, higher_is_better: bool, needs: tuple[str, ...] = (),
                    value_range: Union[ValueRange, Callable[[dict], ValueRange]] = UNBOUNDED,
                    pooled: Optional[Pooling] = None, defaults: Optional[dict] = None):
    """Decorator adding a metric function to the registry under ``name``.

    Args:
        higher_is_better: the metric's direction.
        needs: per-image ground truth the metric takes as keyword arguments (``("boxes",)``).
        value_range: the range of the per-image values: a :class:`ValueRange`, or a function of the
            protocol giving one (e.g. insertion AUCs lie in [0, 1] for probabilities, unbounded for logits).
        pooled: for metrics whose published number is pooled over the dataset (segmentation mIoU,
            open-vocabulary p-mIoU), the function computing it from the per-image ``extras["counts"]``.
        defaults: the protocol keyword arguments and their defaults; read from the signature unless
            given (for registered variants such as ``perturbation_positive`` that fix an argument).
    """

    def deco(fn: Callable[..., MetricResult]) -> Callable[..., MetricResult]:
        d = dict(defaults) if defaults is not None else keyword_defaults(fn, skip=METRIC_RUNTIME + tuple(needs))
        doc = (inspect.getdoc(fn) or "").split("\n", 1)[0]
        rng = value_range if callable(value_range) else (lambda protocol, _r=value_range: _r)
        if not isinstance(rng(dict(d)), ValueRange):
            raise RegistryError(f"metric '{name}': value_range must give a ValueRange.")
        info = REGISTRY.add(MetricInfo(name, fn, bool(higher_is_better), tuple(needs), d, doc, rng, pooled))

        @functools.wraps(fn)
        def checked(*args, **kwargs) -> MetricResult:
            return fn(*args, **info.check(kwargs))

        return checked  # the public function checks its protocol arguments (names, types, choices) first

    return deco


def get_metric(name: str) -> MetricInfo:
    """The registered metric ``name`` (raises :class:`UnknownMethodError` naming the choices)."""
    return REGISTRY.get(name)


def available_metrics() -> list[str]:
    """Names of the registered metrics."""
    return REGISTRY.names()


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
