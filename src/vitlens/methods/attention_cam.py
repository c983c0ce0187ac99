"""AttentionCAM: Grad-CAM applied to the heads of the last attention map (LeGrad supplementary
eq. 10; the ``generate_cam_attn`` baseline of Chefer et al. and of the BT authors' code).

With s the target score and A (B, heads, T, T) the attention probabilities of the block ``layers`` selects (the last by default):

    w_h = mean_{j in patches} ∂s/∂A_h[cls, j]            (one weight per head)
    E   = ReLU( mean_h  w_h · A_h[cls, patches] )

``grad_mean="all"`` averages the gradient over the whole (T, T) map instead of the CLS row's patch
columns (an option; the default follows the reference code).

Named variants (``variant=``; the individual options, when given, override them):

* ``"chefer"`` (default): Chefer et al.'s ``Baselines.generate_cam_attn``
  (``baselines/ViT/ViT_explanation_generator.py``): ``grad_mean="cls_row"``, mean over heads, ReLU.
* ``"legrad"``: LeGrad's supplementary eq. 10 (the AttentionCAM row of LeGrad's tables): the head
  weight is the gradient averaged over *all* positions of the (T, T) map, the weighted CLS rows are
  *summed* over heads, and no ReLU is applied:
  ``E = sum_h mean_{i,j}(∂s/∂A_h[i, j]) · A_h[cls, patches]``.
"""
from __future__ import annotations

from typing import Literal, Optional

from torch import Tensor

from ..models.base import ViTAdapter
from ..models.layers import LayersLike
from ..models.targets import LOGIT, ScoreKind
from ._attention_utils import CLS_BLOCKS, capture, require_cls, score_kind, to_grid
from .base import MethodKind, MethodResult, register

VARIANTS = {"chefer": dict(grad_mean="cls_row", relu=True, head_reduce="mean"),
            "legrad": dict(grad_mean="all", relu=False, head_reduce="sum")}


@register("attention_cam", kind=MethodKind.GRADIENT, token_level=True, needs=CLS_BLOCKS, auto_score=LOGIT,
          renamed={"layer": "layers"},
          description="Head-weighted last-block CLS attention, head weights = mean attention gradient (LeGrad supp. eq. 10)")
def attention_cam(adapter: ViTAdapter, x: Tensor, target=None, *, seed: Optional[int] = 0,
                  batch_size: Optional[int] = None, progress: Optional[bool] = None, score: ScoreKind = "auto",
                  layers: LayersLike = None, variant: Literal["chefer", "legrad"] = "chefer",
                  grad_mean: Optional[Literal["cls_row", "all"]] = None, relu: Optional[bool] = None,
                  head_reduce: Optional[Literal["mean", "sum"]] = None) -> MethodResult:
    """AttentionCAM map.

    Args:
        score: ``"auto"`` (= logit), ``"prob"`` or ``"similarity"``; the map is invariant to a
            positive rescaling of the score.
        layers: the one block whose attention is used (:mod:`vitlens.models.layers`; ``None``: the last).
        variant: ``"chefer"`` (default) or ``"legrad"`` (LeGrad supp. eq. 10), see the module docstring.
        grad_mean: ``"cls_row"`` (mean of the gradient over the CLS row's patch columns) or ``"all"``
            (default: from ``variant``).
        relu: clamp the map at 0 (Grad-CAM's ReLU) (default: from ``variant``).
        head_reduce: ``"mean"`` or ``"sum"`` over heads (default: from ``variant``).

    Returns:
        :class:`MethodResult` with ``token_maps`` (B, gh, gw); ``extras``: the block, score kind and the
        resolved variant options. Needs a CLS token.

    Example::

        >>> exp = vitlens.explain(model, x, "attention_cam", variant="legrad")
    """
    cls = require_cls(adapter, "attention_cam")
    l = adapter.select_layer(layers, "attention_cam")
    preset = VARIANTS[variant]
    grad_mean = preset["grad_mean"] if grad_mean is None else grad_mean
    relu = preset["relu"] if relu is None else bool(relu)
    head_reduce = preset["head_reduce"] if head_reduce is None else head_reduce
    cap = capture(adapter, x, target, sites={"attn": [l]}, grad_of=[("attn", l)], score=score)
    a = cap.values[("attn", l)].float()
    g = cap.grads[("attn", l)].float()
    P = adapter.num_prefix_tokens
    w = g[:, :, cls, P:].mean(-1) if grad_mean == "cls_row" else g.mean((-1, -2))  # (B, H)
    cam = (w[:, :, None] * a[:, :, cls, :])
    cam = cam.mean(1) if head_reduce == "mean" else cam.sum(1)
    if relu:
        cam = cam.clamp(min=0)
    return MethodResult(target=cap.target, token_maps=to_grid(adapter, x, cam), outputs=cap.outputs,
                        extras={"layer": l, "score": score_kind(score, cap.target), "variant": variant,
                                "grad_mean": grad_mean, "relu": relu, "head_reduce": head_reduce})
