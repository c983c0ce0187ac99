"""The :class:`Explanation` returned by :func:`vitlens.explain`."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def minmax(maps: Tensor) -> Tensor:
    """Per-map min-max normalisation to [0, 1] over all but the first dimension.

    A constant map becomes all zeros (not NaN)."""
    flat = maps.reshape(maps.shape[0], -1)
    lo = flat.min(1, keepdim=True).values
    hi = flat.max(1, keepdim=True).values
    span = hi - lo
    out = torch.where(span > 0, (flat - lo) / span.clamp_min(torch.finfo(flat.dtype).tiny), torch.zeros_like(flat))
    return out.reshape(maps.shape)


def upsample(token_maps: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear upsampling of (B, h, w) maps to ``size`` (``align_corners=False``)."""
    return F.interpolate(token_maps[:, None].float(), size=tuple(size), mode="bilinear",
                         align_corners=False)[:, 0]


@dataclass
class Explanation:
    """Saliency maps for a batch of images.

    Attributes:
        maps: (B, H, W) float maps at input resolution; in [0, 1] unless ``normalise=False``.
        token_maps: (B, grid_h, grid_w) maps before upsampling (token-level methods), else ``None``.
        targets: (B,) explained class indices (-1 for text prompts).
        labels: class name or prompt explained for each image.
        scores: (B,) probability (classes) or similarity (prompts) of the target on the clean image,
            when the method computed it.
        method: method name; params: the parameters used (defaults filled in).
        extras: method-specific extra outputs (e.g. TIS masks and their scores).
    """

    maps: Tensor
    token_maps: Optional[Tensor]
    targets: Tensor
    labels: list[str]
    method: str
    params: dict = field(default_factory=dict)
    scores: Optional[Tensor] = None
    extras: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.maps.shape[0])

    def numpy(self):
        """The maps as a (B, H, W) float32 numpy array."""
        return self.maps.detach().float().cpu().numpy()
