"""Open-vocabulary localisation p-mIoU on OpenImages V7 point labels (Bousselham et al., "LeGrad",
Table 2).

For each (image, class) pair the class's map comes from the text prompt ``"a photo of a {class}"``
(``vitlens.data.OpenImagesPoints.prompt``) on a CLIP-style model. The map is min-max normalised (a
constant map becomes 0) and binarised at ``threshold`` (0.5); only the annotated points count: a point
labelled *yes* is ground-truth positive, *no* negative (*unsure* points are dropped by the loader).
Per pair, with P the predicted-positive points and G the ground-truth-positive points,

    intersection = |P and G|,  union = |P or G|.

Per class c, IoU_c = sum over the class's pairs of intersections / sum of unions, and p-mIoU is the mean of
IoU_c over the classes (:func:`open_vocab_scores`). ``values`` holds each pair's own IoU (NaN when its
union is empty). A point at input-grid coordinates (x, y) reads the map pixel (floor(y), floor(x)).
"""
from __future__ import annotations

from typing import Iterable, Optional, Sequence, Union

import torch
from torch import Tensor

from ..errors import InputError
from ..explanation import minmax
from .base import UNIT, MetricResult, check_maps, register_metric


def _pooled(counts, targets, values) -> dict:
    """p-mIoU (LeGrad's OpenImages V7 number) from the stored per-pair counts and their classes."""
    return {"p-mIoU": open_vocab_scores_from_counts(counts, targets)["p_miou"]}


@register_metric("open_vocab", higher_is_better=True, needs=("points", "point_labels"), value_range=UNIT,
                 pooled=lambda counts, targets, values: _pooled(counts, targets, values))
def open_vocab(model, x: Optional[Tensor], maps, targets=None, *, points: Tensor, point_labels: Tensor,
               threshold: float = 0.5, batch_size: Optional[int] = None,
               progress: Optional[bool] = None) -> MetricResult:
    """Point-level IoU of each (image, class) map (see the module docstring).

    Args:
        points: (B, P, 2) point coordinates (x, y) in input-grid pixels (padding rows anywhere).
        point_labels: (B, P): 1 yes, 0 no, -1 padding / ignored.
        targets: the class (prompt) of each row, kept in ``extras["classes"]`` for the per-class mean.

    Returns:
        :class:`MetricResult`: ``values`` (B,) per-pair IoU of the binarised map with the point labels (NaN where
        the union is empty); ``extras["counts"]`` (B, 2) intersections and unions (pooled by
        :func:`open_vocab_scores` into p-mIoU).

    Example::

        >>> res = open_vocab(clip, x, maps, ["a photo of a dog"], points=points, point_labels=labels)
    """
    maps = check_maps(maps, x if isinstance(x, Tensor) else None)
    B, H, W = maps.shape
    pts = torch.as_tensor(points, dtype=torch.float64).to(maps.device)
    lab = torch.as_tensor(point_labels, dtype=torch.long).to(maps.device)
    if pts.dim() != 3 or pts.shape[0] != B or pts.shape[2] != 2 or lab.shape != pts.shape[:2]:
        raise InputError(f"points must be (B, P, 2) and point_labels (B, P) for {B} maps; got "
                         f"{tuple(pts.shape)} and {tuple(lab.shape)}.")
    m = minmax(maps)
    col = pts[..., 0].floor().long().clamp(0, W - 1)
    row = pts[..., 1].floor().long().clamp(0, H - 1)
    val = m.reshape(B, -1).gather(1, row * W + col)
    valid = lab >= 0
    pred = (val > threshold) & valid
    gt = (lab == 1) & valid
    inter = (pred & gt).sum(1)
    union = (pred | gt).sum(1)
    iou = torch.where(union > 0, inter.double() / union.clamp_min(1),
                      torch.full(inter.shape, float("nan"), dtype=torch.float64, device=inter.device))
    classes = list(targets) if isinstance(targets, (list, tuple)) else [targets] * B
    return MetricResult(values=iou.float().cpu(), protocol=dict(threshold=threshold, normalise="per-map min-max"),
                        extras=dict(intersection=inter.cpu(), union=union.cpu(), classes=classes,
                                    counts=torch.stack([inter, union], 1).cpu()))


def open_vocab_scores(results: Union[MetricResult, Iterable[MetricResult]]) -> dict:
    """p-mIoU: per-class IoU (intersections and unions summed over the class's pairs), averaged over classes."""
    if isinstance(results, MetricResult):
        results = [results]
    results = list(results)
    return open_vocab_scores_from_counts(torch.cat([r.extras["counts"] for r in results]),
                                         [c for r in results for c in r.extras["classes"]])


def open_vocab_scores_from_counts(counts, classes: Sequence) -> dict:
    """p-mIoU from per-pair ``counts`` (n, 2) = (intersection, union) and each pair's class: per class
    IoU_c = sum of its intersections / sum of its unions (classes whose union is empty are left out),
    p-mIoU = mean over classes."""
    c = torch.as_tensor(counts, dtype=torch.float64).reshape(-1, 2).tolist()
    if len(c) != len(classes):
        raise InputError(f"{len(c)} pairs of counts but {len(classes)} classes.")
    inter: dict = {}
    union: dict = {}
    for k, (i, u) in zip(classes, c):
        inter[k] = inter.get(k, 0) + i
        union[k] = union.get(k, 0) + u
    per = {k: inter[k] / union[k] for k in inter if union[k] > 0}
    if not per:
        raise InputError("no (image, class) pair with a non-empty union of points.")
    return dict(p_miou=sum(per.values()) / len(per), per_class=per, classes=len(per))
