"""Pointing game (Zhang et al., "Top-down neural attention by excitation backprop", IJCV 2018).

Protocol (TIS, ViT-CX): a hit when the maximum of the saliency map falls inside the union of the
ground-truth boxes of the target class, on the model's input grid. Images whose boxes cover more than
``max_box_fraction`` (0.5) of the image are excluded (their value is NaN). With ``tolerance`` > 0
(TorchRay uses 15 px) a hit is any box pixel within that Euclidean distance of a maximum. When the
maximum is attained at several pixels the image is a hit only if *all* of them are inside
(so a constant map never counts as a hit by luck). An all-zero map is constant: never a hit.

``variant="energy"`` is the energy-based pointing game (Wang et al., "Score-CAM", CVPRW 2020, Sec. 4.3):
the share of the map's positive mass inside the boxes, sum_{p in box} max(L_p, 0) / sum_p max(L_p, 0)
(0 for a map with no positive mass); the same exclusion rule applies. Images with no box pixel at all
are excluded too.

``protocol="tis_code"`` is the TIS authors' ``metrics/pointing_game.py`` (``PointingGame``,
``max_overlap=0.5``, ``config/metric/pointing_game.yaml``): the box mask is built by integer slicing,
``mask[int(y0):int(y1), int(x0):int(x1)] = 1`` for each box on the input grid (coordinates truncated
towards zero, end exclusive), from ``box_coords`` (the boxes after the data transform); an image is
kept when the mask covers strictly less than ``max_box_fraction`` of the pixels (``<``, not ``<=``);
the score is ``mask.flatten()[saliency.flatten().argmax()]``: the *first* maximum in raster order
(torch's ``argmax``), 1 inside, 0 outside. An image whose boxes were all cropped away has an empty
mask, covers 0 < 0.5, and counts as a miss (0), as in the code. The map is the method's raw output
upsampled bilinearly to the input size (``raw_maps``; TIS's ``evaluate.py`` ``Resize``), else ``maps``.
"""
from __future__ import annotations

from typing import Literal, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import InputError
from .base import MetricResult, ValueRange, check_maps, register_metric


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


def pointing_energy(maps: Tensor, boxes: Tensor, *, max_box_fraction: Optional[float] = 0.5,
                    coverage: Optional[Tensor] = None) -> Tensor:
    """Per-image energy-based pointing score in [0, 1] (NaN = excluded); see the module docstring."""
    if maps.shape != boxes.shape:
        raise InputError(f"maps {tuple(maps.shape)} and box masks {tuple(boxes.shape)} differ in shape.")
    maps = maps.float()
    if not torch.isfinite(maps).all():
        raise InputError("saliency maps contain NaN or infinite values.")
    boxes = boxes.bool().to(maps.device)
    pos = maps.clamp_min(0).reshape(maps.shape[0], -1).double()
    inside = boxes.reshape(boxes.shape[0], -1)
    total = pos.sum(1)
    inner = (pos * inside).sum(1)
    out = torch.where(total > 0, inner / total.clamp_min(1e-300), torch.zeros_like(total)).float()
    cover = inside.float().mean(1) if coverage is None else \
        torch.as_tensor(coverage, dtype=torch.float32, device=maps.device)
    excl = ~inside.any(1)
    if max_box_fraction is not None:
        excl |= cover > max_box_fraction
    return torch.where(excl, torch.full_like(out, float("nan")), out)


def tis_box_mask(box_coords, size: tuple[int, int]) -> Tensor:
    """(H, W) float mask of TIS's ``PointingGame``: ``mask[int(y0):int(y1), int(x0):int(x1)] = 1`` per box."""
    H, W = int(size[0]), int(size[1])
    b = torch.as_tensor(np.asarray(box_coords, dtype=np.float64).reshape(-1, 4))
    ys = torch.arange(H)[:, None]
    xs = torch.arange(W)[None, :]
    m = torch.zeros(H, W, dtype=torch.bool)
    if len(b):
        ib = b.trunc().long()  # Python int() truncates towards zero
        x0, y0, x1, y1 = (ib[:, k, None, None] for k in range(4))
        m = ((ys >= y0.clamp(min=0)) & (ys < y1) & (xs >= x0.clamp(min=0)) & (xs < x1)).any(0)
    return m.float()


def pointing_tis_code(maps: Tensor, box_coords, *, max_box_fraction: Optional[float] = 0.5) -> Tensor:
    """Per-image TIS pointing game: 1 hit, 0 miss, NaN when the box mask covers >= ``max_box_fraction``."""
    B, H, W = maps.shape
    if box_coords is None or len(box_coords) != B:
        raise InputError("pointing_game protocol 'tis_code' needs box_coords: one (n, 4) array of input-grid "
                         "boxes (x0, y0, x1, y1) per image.")
    masks = torch.stack([tis_box_mask(bc, (H, W)) for bc in box_coords]).to(maps.device)
    first = maps.reshape(B, -1).argmax(1)  # first maximum (torch.argmax)
    hit = masks.reshape(B, -1).gather(1, first[:, None])[:, 0]
    cover = masks.reshape(B, -1).sum(1) / (H * W)
    if max_box_fraction is None:
        return hit
    return torch.where(cover < max_box_fraction, hit, torch.full_like(hit, float("nan")))


def _hit_range(protocol: dict) -> ValueRange:
    """Hits are 0/1; the energy variant is a share in [0, 1]."""
    return ValueRange(0.0, 1.0, binary=protocol.get("variant", "hit") == "hit")


@register_metric("pointing_game", higher_is_better=True, needs=("boxes",), value_range=_hit_range)
def pointing_game(model, x: Tensor, maps, targets=None, *, boxes: Tensor, tolerance: float = 0.0,
                  max_box_fraction: Optional[float] = 0.5, variant: Literal["hit", "energy"] = "hit",
                  coverage: Optional[Tensor] = None, batch_size: Optional[int] = None,
                  progress: Optional[bool] = None, protocol: Literal["default", "tis_code"] = "default", raw_maps=None,
                  box_coords=None) -> MetricResult:
    """Pointing game (Zhang et al. 2018) per image: 1 hit, 0 miss, NaN excluded; ``.mean()`` is the hit rate.

    Args:
        boxes: (B, H, W) bool masks of the union of the ground-truth boxes *of the target class* on the
            input grid (:meth:`vitlens.data.ImageNetBoxes.box_masks`).
        tolerance: hit radius in pixels around the maximum (0: the paper's TIS/ViT-CX protocol;
            TorchRay uses 15).
        max_box_fraction: exclude images whose boxes cover more than this fraction of the input
            (0.5, TIS and ViT-CX); ``None`` keeps all.
        variant: ``"hit"`` (the pointing game) or ``"energy"`` (Score-CAM's energy-based variant).
        coverage: (B,) exact box-union area fractions used for the exclusion
            (:meth:`vitlens.data.ImageNetBoxes.box_coverage`); default: the masks' pixel fraction.

    No forward pass: ``model``, ``x`` and ``targets`` are accepted for the common metric signature.
    Ties at the maximum count as a hit only when every maximal pixel is inside (a constant or all-zero
    map is never a hit unless the box region covers the whole image).

    Returns:
        :class:`MetricResult`: ``values`` (B,) hits (0/1; the energy variant: a share in [0, 1]), NaN where the
        image is excluded (boxes covering more than ``max_box_fraction`` of it).

    Example::

        >>> res = pointing_game(model, x, exp.maps, exp.targets, boxes=box_masks)
        >>> res.mean()                                   # hit rate over the images kept
    """
    maps = check_maps(maps, x if isinstance(x, Tensor) else None)
    if protocol == "tis_code":
        if variant != "hit" or tolerance:
            raise InputError("pointing_game protocol 'tis_code' has no tolerance or energy variant.")
        if raw_maps is not None:
            from .causal import raw_to_input

            maps = raw_to_input(raw_maps, maps[:, None].expand(-1, 3, -1, -1))
        vals = pointing_tis_code(maps, box_coords, max_box_fraction=max_box_fraction)
        return MetricResult(values=vals.cpu(), protocol=dict(protocol="tis_code", max_box_fraction=max_box_fraction,
                                                             ties="first maximum (argmax)",
                                                             keep="coverage < max_box_fraction",
                                                             boxes="int() truncated slices",
                                                             ranked="raw_maps" if raw_maps is not None else "maps"))
    boxes = torch.as_tensor(boxes).to(maps.device)
    if variant == "hit":
        vals = pointing_hits(maps, boxes, tolerance=tolerance, max_box_fraction=max_box_fraction, coverage=coverage)
    else:  # "energy"
        vals = pointing_energy(maps, boxes, max_box_fraction=max_box_fraction, coverage=coverage)
    return MetricResult(values=vals.cpu(), protocol=dict(tolerance=tolerance, max_box_fraction=max_box_fraction,
                                                         variant=variant, ties="all maxima must be inside",
                                                         exact_coverage=coverage is not None))
