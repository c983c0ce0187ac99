"""Grad-CAM for Vision Transformers (Selvaraju et al. 2017, as adapted to ViT tokens in LeGrad's
supplementary eq. 9 and pytorch-grad-cam): the token activations Z (B, T, D) at one block play the
role of the convolutional feature map,

    alpha_k = mean_{i in patches} ∂s/∂Z[i, k]          (channel weights)
    E_i     = ReLU( mean_k alpha_k · Z[i, k] )          (per patch token i)

Default place: the tokens *entering* the last block (``layer=-1, site="input"``, i.e. the output of
the second-to-last block). The output of the last block is a poor choice for CLS-pooled models:
only the CLS token reaches the head, so the patch tokens' gradients there are exactly zero.
``site`` may be any token-shaped hook site of the block (``input``, ``norm1``, ``mid``, ``norm2``,
``output``). Works without a CLS token (global-pool models).

Named variants (``variant=``; ``layer`` / ``site`` / ``weight_tokens``, when given, override them):

* ``"default"``: the tokens entering the last block, channel weights from the patch tokens' gradient
  (pytorch-grad-cam's ViT recipe, whose ``reshape_transform`` drops the class token).
* ``"legrad"``: LeGrad's supplementary eq. 9 as we read it (the Grad-CAM row of LeGrad's tables):
  the same layer (output of the second-to-last block = input of the last one), with the channel
  weights averaged over *all* tokens of that layer (class / prefix tokens included); the map is read
  on the patch tokens, channel mean, ReLU.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from ..errors import InputError
from ..models.base import ViTAdapter
from ._attention_utils import capture, layer_index, score_kind, to_grid
from .base import MethodResult, register

TOKEN_SITES = ("input", "norm1", "mid", "norm2", "output")


VARIANTS = {"default": dict(layer=-1, site="input", weight_tokens="patch"),
            "legrad": dict(layer=-1, site="input", weight_tokens="all")}


@register("gradcam", kind="gradient", token_level=True,
          description="Grad-CAM on a block's token activations (LeGrad supp. eq. 9)")
def gradcam(adapter: ViTAdapter, x: Tensor, target=None, *, seed: Optional[int] = 0,
            batch_size: Optional[int] = None, progress: Optional[bool] = None, score: str = "auto",
            layer: Optional[int] = None, site: Optional[str] = None, weight_tokens: Optional[str] = None,
            variant: str = "default") -> MethodResult:
    """Grad-CAM map.

    Args:
        score: ``"auto"`` (= logit), ``"prob"`` or ``"similarity"``.
        layer: block index (default -1, the last block).
        site: which tokens of that block: ``"input"`` (default), ``"norm1"``, ``"mid"``, ``"norm2"``
            or ``"output"``.
        weight_tokens: average the gradient over the ``"patch"`` tokens (as the map) or over
            ``"all"`` tokens including the prefix tokens.
        variant: ``"default"`` or ``"legrad"`` (LeGrad supp. eq. 9); supplies the defaults of
            ``layer`` (-1), ``site`` (``"input"``) and ``weight_tokens`` (``"patch"`` / ``"all"``).
    """
    if variant not in VARIANTS:
        raise InputError(f"gradcam: variant must be one of {', '.join(VARIANTS)}, got '{variant}'.")
    preset = VARIANTS[variant]
    layer = preset["layer"] if layer is None else layer
    site = preset["site"] if site is None else site
    weight_tokens = preset["weight_tokens"] if weight_tokens is None else weight_tokens
    l = layer_index(adapter, layer, "gradcam")
    if site not in TOKEN_SITES:
        raise InputError(f"gradcam: site must be one of {', '.join(TOKEN_SITES)}, got '{site}'.")
    if weight_tokens not in ("patch", "all"):
        raise InputError(f"gradcam: weight_tokens must be 'patch' or 'all', got '{weight_tokens}'.")
    cap = capture(adapter, x, target, sites={site: [l]}, grad_of=[(site, l)], score=score)
    z = cap.values[(site, l)].float()
    g = cap.grads[(site, l)].float()
    P = adapter.num_prefix_tokens
    alpha = (g[:, P:] if weight_tokens == "patch" else g).mean(1)  # (B, D)
    cam = (z * alpha[:, None, :]).mean(-1).clamp(min=0)  # (B, T)
    return MethodResult(target=cap.target, token_maps=to_grid(adapter, x, cam), outputs=cap.outputs,
                        extras={"layer": l, "site": site, "score": score_kind(score), "variant": variant,
                                "weight_tokens": weight_tokens})
