"""Positive and negative perturbation (Chefer, Gur & Wolf, "Transformer Interpretability Beyond
Attention Visualization", CVPR 2021, Sec. 4; LeGrad Tables 3, 4, 7).

Protocol (the paper and its evaluation code):

* the pixels of the map at input resolution are ranked, most relevant first (``order="positive"``) or
  least relevant first (``order="negative"``, i.e. the ranking of the negated map); ties in raster order
  (lower flat index first, a stable sort; the code's ``topk`` leaves ties unspecified);
* for p = 0 %, 10 %, ..., 90 % the first ``int(p * H * W)`` ranked pixels are set to 0 in [0, 1] pixel
  space (black, all channels), the image is re-normalised and classified;
* each point is top-1 correctness against the **ground-truth label**: ``argmax(logits) == labels``
  (``pertubation_eval_from_hdf5.py``: ``target == out.max(1)[1]``, where ``target`` is the dataset's
  label whichever class the map explains); the 0 % point is the clean image's correctness
  (the script's ``num_correct_model``), so an image the model gets wrong scores 0 everywhere;
* the explained class is chosen when the maps are made (the scripts' ``--vis-class top`` = the
  predicted class, ``--vis-class target`` = the label; ``vitlens bench --target predicted|label``):
  it changes the ranking, never what counts as correct. ``targets`` is only used when ``labels`` is
  not given (then correctness is measured against ``targets``; ``None``: the class predicted on the
  clean image), for callers without labels; the bench always passes the labels;
* no softmax: the score is the arg-max class of the logits (the script's ``out.data.max(1)[1]``);
* AUC: trapezoid rule over the ten points with x = p in [0, 0.9] (so at most 0.9; the papers report
  it x 100 as a percentage of the accuracy curve's area). Positive: lower is better; negative: higher.
* what the script reads but this metric does not change: the map is min-max normalised there before
  ranking (a monotone map: same ranking), images are ``Resize((224, 224))`` without crop there (the
  bench uses the model's eval transform; ImageNet-Segmentation images are resized without crop).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..batching import batch_slices, resolve_batch_size
from ..batching import progress as progress_bar
from ..errors import InputError
from ..precision import perturbed_forward, runtime
from .base import MetricResult, ValueRange, check_maps, pixel_stats, register_metric, trapezoid
from .causal import saliency_rank

STEPS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def perturbation(model, x: Tensor, maps, targets=None, *, labels=None, order: str = "positive",
                 steps: tuple = STEPS, batch_size: Optional[int] = None,
                 progress: Optional[bool] = None, precision=None, compile: Optional[bool] = None) -> MetricResult:
    """Perturbation AUC of top-1 accuracy per image (see the module docstring).

    Args:
        labels: (B,) ground-truth class indices; correctness is measured against them (Chefer's
            script). ``None``: against ``targets`` (the predicted class when ``targets`` is ``None``).
        order: ``"positive"`` (most relevant pixels removed first; lower is better) or ``"negative"``
            (least relevant first; higher is better).
        steps: fractions of pixels removed (default 0, 0.1, ..., 0.9).
        precision, compile: settings of the perturbed forward passes (:mod:`vitlens.precision`).
    Returns:
        ``values`` (B,) AUC, ``curves`` (B, len(steps)) 0/1 correctness, ``xs`` the fractions.
    """
    from ..models import wrap_model

    if order not in ("positive", "negative"):
        raise InputError(f"perturbation order must be 'positive' or 'negative', got '{order}'.")
    adapter = wrap_model(model)
    x = adapter.check_input(x)
    maps = check_maps(maps, x)
    tgt = adapter.resolve_target(targets if labels is None else _as_indices(labels), x=x)
    if tgt.any_text:
        raise InputError("perturbation measures top-1 accuracy: it needs class labels, not text prompts.")
    B, C, H, W = x.shape
    fr = torch.as_tensor(steps, dtype=torch.float64)
    if fr.dim() != 1 or (fr < 0).any() or (fr > 1).any():
        raise InputError(f"perturbation steps must be fractions in [0, 1]; got {steps}.")
    counts = (fr * (H * W)).long().to(x.device)  # int(p * H * W) as the reference code
    K = counts.numel()
    rank = saliency_rank(maps if order == "positive" else -maps)
    mean, std = pixel_stats(adapter, x)
    black = ((0.0 - mean) / std).reshape(1, C, 1)
    flat = x.reshape(B, C, H * W)
    gh, gw = adapter.grid_size(x)
    bs = resolve_batch_size(batch_size, adapter, gh * gw + adapter.num_prefix_tokens, B * K)
    idx = tgt.index.to(x.device)
    out = torch.empty(B * K, dtype=torch.float32, device=x.device)
    bar = progress_bar(B * K, f"perturbation ({order})", progress, unit="img")
    with torch.no_grad(), runtime(precision, compile):
        for sl in batch_slices(B * K, bs):
            j = torch.arange(sl.start, sl.stop, device=x.device)
            b, k = j // K, j % K
            removed = (rank[b] < counts[k][:, None])[:, None, :]
            imgs = torch.where(removed, black, flat[b]).reshape(-1, C, H, W)
            pred = adapter.class_logits(perturbed_forward(adapter, imgs)).argmax(-1)
            out[sl] = (pred == idx[b]).float()
            bar.update(sl.stop - sl.start)
    bar.close()
    curves = out.reshape(B, K).cpu()
    xs = fr.float()
    values = trapezoid(curves.double(), fr).float()
    return MetricResult(values=values, curves=curves, xs=xs,
                        protocol=dict(order=order, steps=tuple(float(s) for s in steps), fill="black (0 in [0,1] pixel space)",
                                      score="top-1 correctness against " + ("the labels" if labels is not None else "the targets"),
                                      tie_break="raster order (stable sort)",
                                      auc="trapezoid over xs"))


def _as_indices(labels) -> list[int]:
    t = torch.as_tensor(labels).reshape(-1)
    if t.is_floating_point() or t.dtype == torch.bool:
        raise InputError(f"perturbation labels must be class indices, got dtype {t.dtype}.")
    if (t < 0).any():
        raise InputError("perturbation needs a ground-truth label for every image (found a negative label).")
    return t.tolist()


def _steps_range(protocol: dict) -> ValueRange:
    """AUCs of top-1 correctness (0/1) over x in [min step, max step]: [0, max - min]."""
    steps = [float(v) for v in protocol.get("steps") or STEPS]
    return ValueRange(0.0, max(steps) - min(steps))


@register_metric("perturbation_positive", higher_is_better=False, needs=("labels",), value_range=_steps_range)
def perturbation_positive(model, x: Tensor, maps, targets=None, *, labels=None, steps: tuple = STEPS,
                          batch_size: Optional[int] = None, progress: Optional[bool] = None,
                          precision=None, compile: Optional[bool] = None) -> MetricResult:
    """Positive perturbation AUC (Chefer et al. 2021): most relevant pixels removed first; lower is better.

    Returns:
        :class:`MetricResult`: ``values`` (B,) AUCs, ``curves`` (B, steps) top-1 correctness, ``xs`` the steps.

    Example::

        >>> res = perturbation_positive(model, x, exp.maps, exp.targets, labels=labels)
    """
    return perturbation(model, x, maps, targets, labels=labels, order="positive", steps=steps,
                        batch_size=batch_size, progress=progress, precision=precision, compile=compile)


@register_metric("perturbation_negative", higher_is_better=True, needs=("labels",), value_range=_steps_range)
def perturbation_negative(model, x: Tensor, maps, targets=None, *, labels=None, steps: tuple = STEPS,
                          batch_size: Optional[int] = None, progress: Optional[bool] = None,
                          precision=None, compile: Optional[bool] = None) -> MetricResult:
    """Negative perturbation AUC (Chefer et al. 2021): least relevant pixels removed first; higher is better.

    Returns:
        :class:`MetricResult`: ``values`` (B,) AUCs, ``curves`` (B, steps) top-1 correctness, ``xs`` the steps.

    Example::

        >>> res = perturbation_negative(model, x, exp.maps, exp.targets, labels=labels)
    """
    return perturbation(model, x, maps, targets, labels=labels, order="negative", steps=steps,
                        batch_size=batch_size, progress=progress, precision=precision, compile=compile)
