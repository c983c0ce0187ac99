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
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from ..errors import InputError
from ..models.base import ViTAdapter
from ._attention_utils import capture, layer_index, score_kind, to_grid
from .base import MethodResult, register

TOKEN_SITES = ("input", "norm1", "mid", "norm2", "output")


@register("gradcam", kind="gradient", token_level=True,
          description="Grad-CAM on a block's token activations (LeGrad supp. eq. 9)")
def gradcam(adapter: ViTAdapter, x: Tensor, target=None, *, seed: Optional[int] = 0,
            batch_size: Optional[int] = None, progress: Optional[bool] = None, score: str = "auto",
            layer: int = -1, site: str = "input", weight_tokens: str = "patch") -> MethodResult:
    """Grad-CAM map.

    Args:
        score: ``"auto"`` (= logit), ``"prob"`` or ``"similarity"``.
        layer: block index (default -1, the last block).
        site: which tokens of that block: ``"input"`` (default), ``"norm1"``, ``"mid"``, ``"norm2"``
            or ``"output"``.
        weight_tokens: average the gradient over the ``"patch"`` tokens (default, as the map) or over
            ``"all"`` tokens including the prefix tokens.
    """
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
                        extras={"layer": l, "site": site, "score": score_kind(score)})
