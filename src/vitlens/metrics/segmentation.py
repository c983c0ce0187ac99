"""Segmentation by saliency on ImageNet-Segmentation (Guillaumin, Küttel & Ferrari, IJCV 2014), with the
protocol of Chefer, Gur & Wolf (CVPR 2021, Table 2 and their ``imagenet_seg_eval.py``) and LeGrad Table 1.

Per image, the map (at input resolution, i.e. after the bilinear upsampling of token maps, as the
reference code does before thresholding) is min-max normalised (a constant map becomes 0) and
binarised: foreground where ``map > threshold`` (strict, as ``Res.gt(ret)`` in ``imagenet_seg_eval.py``;
pixels equal to the threshold are background, ``Res.le(ret)``) with

* ``threshold=0.5`` (the default): LeGrad Sec. 4.1 / Table 1 (a fixed threshold of 0.5 on the
  min-max normalised map; LeGrad's released code has no evaluation script to check it against);
* ``threshold="mean"``: the map's own mean after min-max normalisation (Chefer et al.,
  ``imagenet_seg_eval.py``: ``ret = Res.mean(); Res_1 = Res.gt(ret)``).

Ground-truth masks hold 1 (object), 0 (background) and negative values for unlabelled pixels, which are
ignored everywhere (the reference code's ``ignore_index=-1`` / ``target > 0`` after ``+ 1``).

* **pixel accuracy** = sum over the dataset of correctly labelled pixels / labelled pixels;
* **mIoU** = mean over the two classes (background, foreground) of the dataset-level IoU
  sum(intersection_c) / sum(union_c) (accumulated over all images, then averaged);
* **mAP** = mean over images of the average precision of the scores (1 - map for the background
  channel, map for the foreground channel, both channels pooled as in the reference code) against the
  one-hot ground truth. AP = sum_k (R_k - R_{k-1}) P_k over the distinct score thresholds (as
  scikit-learn's ``average_precision_score``); an image without positives scores 0.

``values`` holds the per-image AP; ``extras`` the per-image counts that :func:`segmentation_scores`
accumulates into the three dataset-level numbers. No forward pass.

Constant maps: the reference code divides 0 by 0 and sets the NaNs to 0 in both AP channels (every
score equal); here the normalised map is 0, i.e. background scores 1 and foreground 0. Both rank all
pixels of a channel equally; the thresholded mask (all background) is the same.
"""
from __future__ import annotations

from typing import Iterable, Optional, Union

import torch
from torch import Tensor

from ..errors import InputError
from ..explanation import minmax
from .base import UNIT, MetricResult, check_maps, register_metric


def average_precision(scores: Tensor, truth: Tensor, valid: Optional[Tensor] = None) -> Tensor:
    """(B,) average precision of each row of ``scores`` (B, N) against boolean ``truth`` (B, N).

    Ties share a threshold (precision is read at the end of each group of equal scores); entries
    with ``valid == False`` are ignored. Rows without any positive give 0."""
    scores = scores.double()
    truth = truth.bool()
    if valid is not None:
        scores = torch.where(valid, scores, torch.full_like(scores, -float("inf")))
        truth = truth & valid
    B, N = scores.shape
    s, order = scores.sort(dim=1, descending=True, stable=True)
    t = truth.gather(1, order).double()
    tp = t.cumsum(1)
    n = torch.arange(1, N + 1, dtype=torch.float64, device=s.device)
    last = torch.ones_like(t, dtype=torch.bool)
    last[:, :-1] = s[:, 1:] != s[:, :-1]
    idx = torch.where(last, torch.arange(N, device=s.device).expand(B, N), torch.full((B, N), N, device=s.device))
    group_end = idx.flip(1).cummin(1).values.flip(1)
    prec = (tp / n).gather(1, group_end.clamp(max=N - 1))
    pos = t.sum(1)
    ap = (t * prec).sum(1) / pos.clamp_min(1)
    return torch.where(pos > 0, ap, torch.zeros_like(ap))


def _pooled(counts, targets, values) -> dict:
    """The dataset numbers of ``imagenet_seg_eval.py`` from the stored per-image counts and APs."""
    s = segmentation_scores_from_counts(counts, values)
    return {"pixel acc": s["pixel_accuracy"], "mIoU": s["miou"], "mAP": s["map"]}


@register_metric("segmentation", higher_is_better=True, needs=("masks",), value_range=UNIT,
                 pooled=lambda counts, targets, values: _pooled(counts, targets, values))
def segmentation(model, x: Optional[Tensor], maps, targets=None, *, masks: Tensor,
                 threshold: Union[str, float] = 0.5, batch_size: Optional[int] = None,
                 progress: Optional[bool] = None) -> MetricResult:
    """Per-image segmentation AP and the counts for pixel accuracy / mIoU (see the module docstring).

    Args:
        masks: (B, H, W) ground truth at the maps' resolution (1 object, 0 background, < 0 ignored),
            e.g. from :meth:`vitlens.data.ImageNetSegmentation.batch`.
        threshold: a number in [0, 1] (default 0.5: LeGrad Sec. 4.1) or ``"mean"`` (Chefer et al.).

    Returns:
        :class:`MetricResult`: ``values`` (B,) per-image average precision; ``extras``: pixel counts,
        intersections and unions per image (``counts`` (B, 6)), pooled by :func:`segmentation_scores`.

    Example::

        >>> res = segmentation(model, x, exp.maps, masks=gt_masks)
        >>> segmentation_scores(res)["miou"]
    """
    maps = check_maps(maps, x if isinstance(x, Tensor) else None)
    masks = torch.as_tensor(masks).to(maps.device)
    if masks.shape != maps.shape:
        raise InputError(f"segmentation masks {tuple(masks.shape)} and maps {tuple(maps.shape)} differ in shape.")
    m = minmax(maps).reshape(maps.shape[0], -1).double()
    lab = masks.reshape(masks.shape[0], -1).long()
    valid = lab >= 0
    if threshold == "mean":
        thr = m.mean(1, keepdim=True)
    elif isinstance(threshold, (int, float)) and not isinstance(threshold, bool):
        thr = torch.full((m.shape[0], 1), float(threshold), dtype=m.dtype, device=m.device)
    else:
        raise InputError(f"threshold must be 'mean' or a number, got {threshold!r}.")
    fg = m > thr
    gt = lab == 1
    correct = ((fg == gt) & valid).sum(1)
    labeled = valid.sum(1)
    inter = torch.stack([((~fg) & (~gt) & valid).sum(1), (fg & gt & valid).sum(1)], 1)
    union = torch.stack([(((~fg) | (~gt)) & valid).sum(1), ((fg | gt) & valid).sum(1)], 1)
    ap = average_precision(torch.cat([1 - m, m], 1), torch.cat([~gt, gt], 1), torch.cat([valid, valid], 1))
    return MetricResult(values=ap.float().cpu(),
                        protocol=dict(threshold=threshold, normalise="per-map min-max",
                                      ap="both channels pooled (1 - map, map)"),
                        extras=dict(pixel_correct=correct.cpu(), pixel_labeled=labeled.cpu(),
                                    intersection=inter.cpu(), union=union.cpu(),
                                    counts=torch.cat([correct[:, None], labeled[:, None], inter, union], 1).cpu()))


#: the columns of ``extras["counts"]`` (what ``vitlens bench`` stores per image to rebuild the dataset numbers)
COUNTS = ("pixel_correct", "pixel_labeled", "intersection_bg", "intersection_fg", "union_bg", "union_fg")


def segmentation_scores_from_counts(counts, ap) -> dict:
    """Dataset-level numbers from per-image ``counts`` (n, 6) (:data:`COUNTS`) and per-image AP (n,):
    pixel accuracy = sum correct / sum labelled; IoU_c = sum intersection_c / sum union_c; mIoU = mean_c;
    mAP = mean AP (``imagenet_seg_eval.py``: ``total_correct / total_label``, ``total_inter / total_union``,
    ``np.mean(total_ap)``)."""
    c = torch.as_tensor(counts, dtype=torch.float64).reshape(-1, len(COUNTS))
    ap = torch.as_tensor(ap, dtype=torch.float64).reshape(-1)
    if c.shape[0] == 0:
        raise InputError("no segmentation results to summarise.")
    tot = c.sum(0)
    iou = tot[2:4] / tot[4:6].clamp_min(1)
    return dict(pixel_accuracy=float(tot[0] / tot[1].clamp_min(1)), iou=iou.tolist(), miou=float(iou.mean()),
                map=float(ap.mean()), images=int(ap.numel()))


def segmentation_scores(results: Union[MetricResult, Iterable[MetricResult]]) -> dict:
    """Dataset-level ``pixel_accuracy``, ``miou`` (and per-class ``iou``) and ``map`` from
    :func:`segmentation` results of one or several batches."""
    if isinstance(results, MetricResult):
        results = [results]
    results = list(results)
    if not results:
        raise InputError("no segmentation results to summarise.")
    return segmentation_scores_from_counts(torch.cat([r.extras["counts"] for r in results]),
                                           torch.cat([r.values for r in results]))
