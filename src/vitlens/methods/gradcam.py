"""Grad-CAM for Vision Transformers (Selvaraju et al. 2017, as adapted to ViT tokens in LeGrad's
supplementary eq. 9 and pytorch-grad-cam): the token activations Z (B, T, D) at one block play the
role of the convolutional feature map,

    alpha_k = mean_{i in patches} ∂s/∂Z[i, k]          (channel weights)
    E_i     = ReLU( mean_k alpha_k · Z[i, k] )          (per patch token i)

Default place: the tokens *entering* the last block (``layers=None, site="input"``, i.e. the output of
the second-to-last block). The output of the last block is a poor choice for CLS-pooled models:
only the CLS token reaches the head, so the patch tokens' gradients there are exactly zero.
``site`` may be any token-shaped hook site of the block (:data:`vitlens.models.blocks.FeatureSite`). Works without a CLS token (global-pool models).

Named variants (``variant=``; ``weight_tokens``, when given, overrides them):

* ``"default"``: the tokens entering the last block, channel weights from the patch tokens' gradient
  (pytorch-grad-cam's ViT recipe, whose ``reshape_transform`` drops the class token).
* ``"legrad"``: LeGrad's supplementary eq. 9 as we read it (the Grad-CAM row of LeGrad's tables):
  the same layer (output of the second-to-last block = input of the last one), with the channel
  weights averaged over *all* tokens of that layer (class / prefix tokens included); the map is read
  on the patch tokens, channel mean, ReLU.
"""
from __future__ import annotations

from typing import Literal, Optional

from torch import Tensor

from ..models.base import ViTAdapter
from ..models.blocks import FeatureSite
from ..models.capabilities import Capability
from ..models.layers import LayersLike
from ..models.targets import LOGIT, ScoreKind
from ._attention_utils import capture, score_kind, to_grid
from .base import MethodKind, MethodResult, register

#: what each variant sets (``weight_tokens`` given explicitly overrides it)
VARIANTS = {"default": dict(weight_tokens="patch"), "legrad": dict(weight_tokens="all")}


@register("gradcam", kind=MethodKind.GRADIENT, token_level=True, needs=(Capability.BLOCKS,), auto_score=LOGIT,
          renamed={"layer": "layers"},
          description="Grad-CAM on a block's token activations (LeGrad supp. eq. 9)")
def gradcam(adapter: ViTAdapter, x: Tensor, target=None, *, seed: Optional[int] = 0,
            batch_size: Optional[int] = None, progress: Optional[bool] = None, score: ScoreKind = "auto",
            layers: LayersLike = None, site: FeatureSite = "input",
            weight_tokens: Optional[Literal["patch", "all"]] = None,
            variant: Literal["default", "legrad"] = "default") -> MethodResult:
    """Grad-CAM map.

    Args:
        score: ``"auto"`` (= logit), ``"prob"`` or ``"similarity"``.
        layers: the one block whose tokens are read (:mod:`vitlens.models.layers`; ``None``: the last
            block; ``[8]``: block 8).
        site: which tokens of that block (:data:`vitlens.models.blocks.FeatureSite`): ``"input"``
            (default), ``"norm1"``, ``"mid"``, ``"norm2"``, ``"output"``, ...
        weight_tokens: average the gradient over the ``"patch"`` tokens (as the map) or over
            ``"all"`` tokens including the prefix tokens (default: from ``variant``).
        variant: ``"default"`` (``weight_tokens="patch"``) or ``"legrad"`` (LeGrad supp. eq. 9:
            ``weight_tokens="all"``).

    Returns:
        :class:`MethodResult` with ``token_maps`` (B, gh, gw); ``extras``: block, site, score kind, variant.

    Example::

        >>> exp = vitlens.explain(model, x, "gradcam", layers=[8], variant="legrad")   # LeGrad supp. 9.2
    """
    l = adapter.select_layer(layers, "gradcam")
    weight_tokens = VARIANTS[variant]["weight_tokens"] if weight_tokens is None else weight_tokens
    cap = capture(adapter, x, target, sites={site: [l]}, grad_of=[(site, l)], score=score)
    z = cap.values[(site, l)].float()
    g = cap.grads[(site, l)].float()
    P = adapter.num_prefix_tokens
    alpha = (g[:, P:] if weight_tokens == "patch" else g).mean(1)  # (B, D)
    cam = (z * alpha[:, None, :]).mean(-1).clamp(min=0)  # (B, T)
    return MethodResult(target=cap.target, token_maps=to_grid(adapter, x, cam), outputs=cap.outputs,
                        extras={"layer": l, "site": site, "score": score_kind(score, cap.target), "variant": variant,
                                "weight_tokens": weight_tokens})
