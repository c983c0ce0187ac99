"""Sparseness (Chalasani, Chen, Chowdhury, Wu & Jha, "Concise Explanations of Neural Networks using
Adversarial Training", ICML 2020): the Gini index of the map (Hurley & Rickard 2009).

For a map flattened to a_1..a_N and sorted ascending (a_(1) <= ... <= a_(N)):

    G(a) = sum_k (2k - N - 1) a_(k) / (N sum_k a_(k))      (= 1 - 2 sum_k a_(k)/||a||_1 (N - k + 1/2)/N)

in [0, 1 - 1/N]; 1 - 1/N for a single non-zero pixel, 0 for a constant map. As in TIS, a map with
negative values is first shifted to be non-negative (a - min(a)); an all-zero (or constant) map scores 0
(the formula's 0/0 is defined as 0). Higher is sparser. No forward pass.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .base import MetricResult, check_maps, register_metric


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


@register_metric("sparseness", higher_is_better=True)
def sparseness(model, x: Tensor, maps, targets=None, *, batch_size: Optional[int] = None,
               progress: Optional[bool] = None) -> MetricResult:
    """Gini-index sparseness of each map (see the module docstring); ``model``/``targets`` unused."""
    maps = check_maps(maps, x if isinstance(x, Tensor) else None)
    return MetricResult(values=gini(maps).cpu(), protocol=dict(shift="a - min(a) when min(a) < 0",
                                                               zero_map=0.0))
