"""Grid pointing game (Böhle, Fritz & Schiele, "B-cos Networks", CVPR 2022; Rao, Böhle & Schiele,
"Towards Better Understanding Attribution Methods", CVPR 2022, Sec. 4.1 "GridPG").

A grid image is a 2 x 2 mosaic of four images of *different* classes, each classified correctly and
confidently by the model on its own; every cell is downscaled to (H/2, W/2) so the mosaic has the
model's input size (a fixed-size ViT cannot take the papers' 448 x 448 mosaic). Explaining the class of
cell c, the localisation score is the share of positive attribution inside that cell:

    L_c = sum_{p in cell c} max(A_p, 0) / sum_p max(A_p, 0)       (0 for a map with no positive mass)

in [0, 1]; 1/4 is the score of a uniform map. Unlike the box pointing game it has exact ground truth.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import InputError
from .base import UNIT, MetricResult, check_maps, register_metric


def cell_masks(size: tuple[int, int], grid: tuple[int, int] = (2, 2)) -> Tensor:
    """(rows * cols, H, W) bool masks of the grid cells in row-major order."""
    H, W = size
    r, c = grid
    ys = torch.arange(H) * r // H
    xs = torch.arange(W) * c // W
    cell = ys[:, None] * c + xs[None, :]
    return cell[None] == torch.arange(r * c)[:, None, None]


def make_grids(model, x: Tensor, labels: Sequence[int], *, min_confidence: float = 0.99,
               grid: tuple[int, int] = (2, 2), seed: Optional[int] = 0, batch_size: Optional[int] = None):
    """Build grid images from a pool of images.

    Keeps the images that the model classifies correctly with softmax confidence >= ``min_confidence``,
    shuffles them (seeded), and fills grids greedily with images of classes not yet in the grid.
    Returns ``(grids (G, 3, H, W), classes (G, cells) long, sources (G, cells) long pool indices)``.
    Each source image is resized to (H / rows, W / cols) with antialiased bilinear interpolation.
    """
    from ..batching import batch_slices, generator, resolve_batch_size
    from ..models import wrap_model

    a = wrap_model(model)
    x = a.check_input(x)
    labels = torch.as_tensor(list(labels), dtype=torch.long)
    if labels.numel() != x.shape[0]:
        raise InputError(f"{labels.numel()} labels for {x.shape[0]} images.")
    gh, gw = a.grid_size(x)
    bs = resolve_batch_size(batch_size, a, gh * gw + a.num_prefix_tokens, x.shape[0])
    probs = []
    with torch.no_grad():
        for sl in batch_slices(x.shape[0], bs):
            probs.append(a.class_logits(a.forward(x[sl])).float().softmax(-1).cpu())
    p = torch.cat(probs)
    conf, pred = p.max(-1)
    ok = torch.nonzero((pred == labels) & (conf >= min_confidence)).flatten()
    ok = ok[torch.randperm(ok.numel(), generator=generator(seed))]
    n = grid[0] * grid[1]
    groups, open_ = [], []
    for i in ok.tolist():  # greedy grouping over the pool (bookkeeping, not tensor work)
        for g in open_:
            if all(labels[j] != labels[i] for j in g):
                g.append(i)
                if len(g) == n:
                    groups.append(g)
                    open_.remove(g)
                break
        else:
            open_.append([i])
    if not groups:
        raise InputError(f"not enough confidently (>= {min_confidence}) and correctly classified images of "
                         f"{n} different classes to build a grid.")
    H, W = x.shape[-2:]
    ch, cw = H // grid[0], W // grid[1]
    src = torch.tensor(groups, dtype=torch.long)
    small = F.interpolate(x[src.flatten().to(x.device)], size=(ch, cw), mode="bilinear", antialias=True,
                          align_corners=False)
    small = small.reshape(len(groups), grid[0], grid[1], 3, ch, cw)
    mosaic = small.permute(0, 3, 1, 4, 2, 5).reshape(len(groups), 3, grid[0] * ch, grid[1] * cw)
    if mosaic.shape[-2:] != (H, W):
        mosaic = F.pad(mosaic, (0, W - mosaic.shape[-1], 0, H - mosaic.shape[-2]))
    return mosaic, labels[src], src


@register_metric("grid_pointing_game", higher_is_better=True, needs=("cells",), value_range=UNIT)
def grid_pointing_game(model, x: Optional[Tensor], maps, targets=None, *, cells: Tensor,
                       grid: tuple[int, int] = (2, 2), batch_size: Optional[int] = None,
                       progress: Optional[bool] = None) -> MetricResult:
    """Grid pointing-game localisation score per map (see the module docstring).

    Args:
        cells: (B,) index (row-major) of the cell whose class each map explains.
        grid: (rows, cols) of the mosaic (2 x 2).

    Returns:
        :class:`MetricResult`: ``values`` (B,) in [0, 1], the share of each map's positive mass in its cell.

    Example::

        >>> mosaic, labels, cells = make_grids(model, x, labels)
        >>> res = grid_pointing_game(model, mosaic, vitlens.explain(model, mosaic, "legrad", target=labels).maps,
        ...                          labels, cells=cells)
    """
    maps = check_maps(maps, x if isinstance(x, Tensor) else None)
    cells = torch.as_tensor(cells, dtype=torch.long).reshape(-1).to(maps.device)
    n = grid[0] * grid[1]
    if cells.numel() != maps.shape[0] or (cells < 0).any() or (cells >= n).any():
        raise InputError(f"cells must give one index in [0, {n}) per map.")
    cm = cell_masks(tuple(maps.shape[-2:]), grid).to(maps.device)[cells]
    pos = maps.clamp_min(0).double()
    total = pos.sum((1, 2))
    inner = (pos * cm).sum((1, 2))
    vals = torch.where(total > 0, inner / total.clamp_min(1e-300), torch.zeros_like(total)).float()
    return MetricResult(values=vals.cpu(), protocol=dict(grid=tuple(grid), score="positive mass in target cell"))
