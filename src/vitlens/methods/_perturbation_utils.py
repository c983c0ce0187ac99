"""Helpers shared by the perturbation and input-gradient methods (RISE, occlusion, Score-CAM,
Integrated Gradients, SmoothGrad).

* :func:`clean_pass` runs the one forward pass on the clean images (needed for ``target=None`` and
  returned as ``MethodResult.outputs``), optionally with hooks;
* :func:`baseline_image` turns a baseline name into an image in the model's normalised space;
* :func:`row_targets` / :func:`row_scores` score batches of perturbed copies, each row knowing
  which source image (and so which target) it belongs to;
* :func:`captum_forward` is the scalar forward function handed to Captum;
* :func:`reduce_channels` turns (B, 3, H, W) attributions into (B, H, W) maps.
"""
from __future__ import annotations

from typing import Callable, Literal, Mapping, Optional, Union, get_args

import torch
from torch import Tensor

from ..errors import InputError
from ..models.base import ViTAdapter
from ..models.blocks import Hook
from ..models.targets import PROB_OR_SIMILARITY, AutoScore, Target
from ..precision import perturbed_forward

#: a named baseline image or a constant in the normalised space (see :func:`baseline_image`)
BaselineLike = Union[Literal["zero", "black"], float]
BASELINES = get_args(get_args(BaselineLike)[0])
#: colour-channel reductions of pixel attributions (see :func:`reduce_channels`)
Reduce = Literal["abs_sum", "sum", "abs_of_sum", "max_abs", "l2"]
REDUCTIONS = get_args(Reduce)


def clean_pass(adapter: ViTAdapter, x: Tensor, target, score: str,
               hooks: Mapping[str, Hook] | None = None,
               rule: AutoScore = PROB_OR_SIMILARITY) -> tuple[Tensor, Target, str]:
    """Forward the clean images once (no grad): (outputs, resolved target, score kind resolved by ``rule``)."""
    with torch.no_grad():
        outputs = adapter.forward(x, hooks=hooks)
    tgt = adapter.resolve_target(target, outputs=outputs, batch=x.shape[0])
    return outputs, tgt, rule.resolve(score, tgt)


def baseline_image(adapter: ViTAdapter, x: Tensor, baseline: BaselineLike) -> Tensor:
    """The reference image a perturbation moves towards, in the model's normalised space, (1, 3, 1, 1).

    * ``"zero"``: 0 of the normalised tensor, i.e. the normalisation mean colour (a mid grey); this is
      what multiplying the normalised input by a mask (RISE, Score-CAM reference code) produces;
    * ``"black"``: pixel value 0 normalised with the adapter's mean/std, ``(0 - mean) / std``;
    * a number: that constant in normalised space.
    """
    if isinstance(baseline, bool) or not isinstance(baseline, (str, float, int)):
        raise InputError(f"baseline must be one of {BASELINES} or a number, got {baseline!r}.")
    if isinstance(baseline, str):
        if baseline == "zero":
            vals = [0.0, 0.0, 0.0]
        elif baseline == "black":
            vals = [-m / s for m, s in zip(adapter.mean, adapter.std)]
        else:
            raise InputError(f"unknown baseline '{baseline}'; choose one of {', '.join(BASELINES)} or a number.")
    else:
        vals = [float(baseline)] * 3
    return torch.tensor(vals, device=x.device, dtype=x.dtype).reshape(1, 3, 1, 1)


def row_targets(tgt: Target, image_index: Tensor) -> Target:
    """Targets of perturbed rows: row ``r`` explains the target of image ``image_index[r]``."""
    return tgt.select(image_index)


def row_scores(adapter: ViTAdapter, inputs: Tensor, tgt: Target, image_index: Optional[Tensor], kind: str) -> Tensor:
    """Score (float32, (n,)) of a batch of perturbed images.

    Row ``r`` is scored for image ``image_index[r]``; with ``image_index=None``, ``tgt`` already holds one
    target per row (e.g. ``tgt.repeat_interleave(n).select(slice)``, which stays on the device). The
    forward pass follows the current precision / compile settings (:func:`vitlens.precision.perturbed_forward`,
    float32 outputs, so the softmax and the scores are float32)."""
    out = perturbed_forward(adapter, inputs)
    rows = tgt if image_index is None else row_targets(tgt, image_index)
    return adapter.score(out, rows, kind).float()


def captum_forward(adapter: ViTAdapter, kind: str) -> Callable[..., Tensor]:
    """A forward function for Captum: ``f(inputs, index, is_text, text) -> (n,)`` target scores.

    The target travels as *additional forward arguments*, which Captum expands exactly like the
    inputs (step-major for IG), so every row is scored against its own image's target."""

    def f(inputs: Tensor, index: Tensor, is_text: Tensor, text: Optional[Tensor] = None) -> Tensor:
        t = Target(index=index, labels=[""] * int(index.shape[0]), text=text, is_text=is_text)
        return adapter.score(adapter.forward(inputs), t, kind)

    return f


def captum_target_args(tgt: Target, sl: slice | None = None) -> tuple:
    t = tgt if sl is None else tgt.select(sl)
    return (t.index, t.is_text, t.text)


def reduce_channels(attr: Tensor, reduce: Reduce) -> Tensor:
    """(B, C, H, W) attributions -> (B, H, W) pixel maps.

    * ``"abs_sum"``: sum_c |a_c| (the grey-scale rendering of the SmoothGrad/IG authors' saliency
      library; the default);
    * ``"sum"``: sum_c a_c, signed (keeps IG's completeness: the map sums to F(x) - F(x'));
    * ``"abs_of_sum"``: |sum_c a_c| (Captum's ``visualize_image_attr(sign="absolute_value")``);
    * ``"max_abs"``: max_c |a_c| (Simonyan et al. 2014, vanilla gradient saliency);
    * ``"l2"``: sqrt(sum_c a_c^2).
    """
    if reduce == "abs_sum":
        return attr.abs().sum(1)
    if reduce == "sum":
        return attr.sum(1)
    if reduce == "abs_of_sum":
        return attr.sum(1).abs()
    if reduce == "max_abs":
        return attr.abs().amax(1)
    if reduce == "l2":
        return attr.pow(2).sum(1).sqrt()
    raise InputError(f"unknown channel reduction '{reduce}'; choose one of {', '.join(REDUCTIONS)}.")


def pair(v, name: str) -> tuple[int, int]:
    """An int or a pair of ints -> (h, w), each >= 1."""
    if isinstance(v, (tuple, list)):
        if len(v) != 2:
            raise InputError(f"{name} must be an int or a pair (h, w), got {v!r}.")
        h, w = int(v[0]), int(v[1])
    else:
        h = w = int(v)
    if h < 1 or w < 1:
        raise InputError(f"{name} must be >= 1, got {v!r}.")
    return h, w
