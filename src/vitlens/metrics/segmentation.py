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
from .base import MetricResult, check_maps, register_metric


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


@register_metric("segmentation", higher_is_better=True, needs=("masks",))
def segmentation(model, x: Optional[Tensor], maps, targets=None, *, masks: Tensor,
                 threshold: Union[str, float] = 0.5, batch_size: Optional[int] = None,
                 progress: Optional[bool] = None) -> MetricResult:
    """Per-image segmentation AP and the counts for pixel accuracy / mIoU (see the module docstring).

    Args:
        masks: (B, H, W) ground truth at the maps' resolution (1 object, 0 background, < 0 ignored),
            e.g. from :meth:`vitlens.data.ImageNetSegmentation.batch`.
        threshold: a number in [0, 1] (default 0.5: LeGrad Sec. 4.1) or ``"mean"`` (Chefer et al.).
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
                                    intersection=inter.cpu(), union=union.cpu()))


def segmentation_scores(results: Union[MetricResult, Iterable[MetricResult]]) -> dict:
    """Dataset-level ``pixel_accuracy``, ``miou`` (and per-class ``iou``) and ``map`` from
    :func:`segmentation` results of one or several batches."""
    if isinstance(results, MetricResult):
        results = [results]
    results = list(results)
    if not results:
        raise InputError("no segmentation results to summarise.")
    correct = sum(int(r.extras["pixel_correct"].sum()) for r in results)
    labeled = sum(int(r.extras["pixel_labeled"].sum()) for r in results)
    inter = sum(r.extras["intersection"].sum(0).double() for r in results)
    union = sum(r.extras["union"].sum(0).double() for r in results)
    iou = inter / union.clamp_min(1)
    ap = torch.cat([r.values for r in results])
    return dict(pixel_accuracy=correct / max(labeled, 1), iou=iou.tolist(), miou=float(iou.mean()),
                map=float(ap.mean()), images=int(ap.numel()))
