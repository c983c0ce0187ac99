"""Sparseness (Chalasani, Chen, Chowdhury, Wu & Jha, "Concise Explanations of Neural Networks using
Adversarial Training", ICML 2020): the Gini index of the map (Hurley & Rickard 2009).

For a map flattened to a_1..a_N and sorted ascending (a_(1) <= ... <= a_(N)):

    G(a) = sum_k (2k - N - 1) a_(k) / (N sum_k a_(k))      (= 1 - 2 sum_k a_(k)/||a||_1 (N - k + 1/2)/N)

in [0, 1 - 1/N]; 1 - 1/N for a single non-zero pixel, 0 for a constant map. As in TIS, a map with
negative values is first shifted to be non-negative (a - min(a)); an all-zero (or constant) map scores 0
(the formula's 0/0 is defined as 0). Higher is sparser. No forward pass.

``protocol="tis_code"``: the TIS authors' ``metrics/sparseness.py`` with ``shift: true``
(``config/metric/sparseness.yaml``), on the map TIS's ``evaluate.py`` feeds it: the method's *raw*
output (``raw_maps``, not min-max normalised) upsampled bilinearly to the input size (its ``Resize``;
``maps`` when no raw map is given). The shift ``a - min(a)`` is always applied, then ``1e-7`` is added
to every value (the code's guard against zeros), then the Gini formula above. Because of the additive
``1e-7`` the result depends on the map's scale, which is why the raw map matters.
"""
from __future__ import annotations

from typing import Literal, Optional

import torch
from torch import Tensor

from ..errors import InputError
from .base import UNIT, MetricResult, check_maps, register_metric


def gini(maps: Tensor) -> Tensor:
    """(B,) Gini index of each (B, ...) map after the non-negative shift."""
    a = maps.reshape(maps.shape[0], -1).double()
    a = torch.where(a.min(1, keepdim=True).values < 0, a - a.min(1, keepdim=True).values, a)
    a = a.sort(1).values
    n = a.shape[1]
    k = torch.arange(1, n + 1, dtype=a.dtype, device=a.device)
    total = a.sum(1)
    num = ((2 * k - n - 1) * a).sum(1)
    return torch.where(total > 0, num / (n * total.clamp_min(1e-300)), torch.zeros_like(total)).float()


TIS_EPS = 1e-7


def gini_tis(maps: Tensor) -> Tensor:
    """(B,) TIS's sparseness: ``a - min(a) + 1e-7``, sorted ascending, Gini formula (float64 here)."""
    a = maps.reshape(maps.shape[0], -1).double()
    a = a - a.min(1, keepdim=True).values + TIS_EPS
    a = a.sort(1).values
    n = a.shape[1]
    k = torch.arange(1, n + 1, dtype=a.dtype, device=a.device)
    return (((2 * k - n - 1) * a).sum(1) / (n * a.sum(1))).float()


@register_metric("sparseness", higher_is_better=True, value_range=UNIT)
def sparseness(model, x: Tensor, maps, targets=None, *, batch_size: Optional[int] = None,
               progress: Optional[bool] = None, protocol: Literal["default", "tis_code"] = "default", raw_maps=None) -> MetricResult:
    """Gini-index sparseness of each map (see the module docstring); ``model``/``targets`` unused.

    Returns:
        :class:`MetricResult`: ``values`` (B,) Gini indices in [0, 1] (1: all mass on one pixel).

    Example::

        >>> res = sparseness(model, x, exp.maps)
    """
    maps = check_maps(maps, x if isinstance(x, Tensor) else None)
    if protocol == "tis_code":
        if raw_maps is not None:
            from .causal import raw_to_input

            maps = raw_to_input(raw_maps, maps[:, None].expand(-1, 3, -1, -1))
        return MetricResult(values=gini_tis(maps).cpu(), protocol=dict(protocol="tis_code", shift="a - min(a)",
                                                                       eps=TIS_EPS,
                                                                       map="raw upsampled" if raw_maps is not None
                                                                       else "maps"))
    return MetricResult(values=gini(maps).cpu(), protocol=dict(shift="a - min(a) when min(a) < 0",
                                                               zero_map=0.0))
