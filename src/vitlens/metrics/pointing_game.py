"""Pointing game (Zhang et al., "Top-down neural attention by excitation backprop", IJCV 2018).

Protocol (TIS, ViT-CX): a hit when the maximum of the saliency map falls inside the union of the
ground-truth boxes of the target class, on the model's input grid. Images whose boxes cover more than
``max_box_fraction`` (0.5) of the image are excluded (their value is NaN). With ``tolerance`` > 0
(TorchRay uses 15 px) a hit is any box pixel within that Euclidean distance of a maximum. When the
maximum is attained at several pixels the image is a hit only if *all* of them are inside
(so a constant map never counts as a hit by luck).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import InputError


def _dilate(mask: Tensor, radius: float) -> Tensor:
    r = int(radius)
    yy, xx = torch.meshgrid(torch.arange(-r, r + 1), torch.arange(-r, r + 1), indexing="ij")
    kernel = ((yy ** 2 + xx ** 2) <= radius ** 2).float()[None, None].to(mask.device)
    return F.conv2d(mask[:, None].float(), kernel, padding=r)[:, 0] > 0


def pointing_hits(maps: Tensor, boxes: Tensor, *, tolerance: float = 0.0,
                  max_box_fraction: Optional[float] = 0.5, coverage: Optional[Tensor] = None) -> Tensor:
    """Per-image hit (1.0), miss (0.0) or excluded (NaN).

    Args:
        maps: (B, H, W) saliency maps at input resolution.
        boxes: (B, H, W) bool masks of the union of the ground-truth boxes.
        coverage: (B,) exact area fraction covered by the boxes (from
            :meth:`vitlens.data.ImageNetBoxes.box_coverage`); default: the mask's pixel fraction.
    """
    if maps.shape != boxes.shape:
        raise InputError(f"maps {tuple(maps.shape)} and box masks {tuple(boxes.shape)} differ in shape.")
    maps = maps.float()
    if not torch.isfinite(maps).all():
        raise InputError("saliency maps contain NaN or infinite values.")
    boxes = boxes.bool().to(maps.device)
    region = _dilate(boxes, tolerance) if tolerance > 0 else boxes
    flat = maps.reshape(maps.shape[0], -1)
    is_max = flat == flat.max(1, keepdim=True).values
    inside = region.reshape(region.shape[0], -1)
    hit = (is_max & ~inside).sum(1) == 0
    out = hit.float()
    cover = boxes.reshape(boxes.shape[0], -1).float().mean(1) if coverage is None else \
        torch.as_tensor(coverage, dtype=torch.float32, device=maps.device)
    empty = ~boxes.reshape(boxes.shape[0], -1).any(1)
    excl = empty.clone()
    if max_box_fraction is not None:
        excl |= cover > max_box_fraction
    return torch.where(excl, torch.full_like(out, float("nan")), out)


def pointing_game(model, x: Tensor, maps: Tensor, targets=None, *, boxes: Tensor, tolerance: float = 0.0,
                  max_box_fraction: Optional[float] = 0.5, coverage: Optional[Tensor] = None) -> Tensor:
    """Pointing-game hits per image (NaN = excluded); ``nanmean`` gives the hit rate.

    ``model``, ``x`` and ``targets`` are accepted for the common metric signature; the boxes must be
    those of the target class."""
    return pointing_hits(maps, boxes, tolerance=tolerance, max_box_fraction=max_box_fraction, coverage=coverage)
