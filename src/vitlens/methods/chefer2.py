"""Gradient-weighted attention rollout of Chefer, Gur & Wolf, "Generic Attention-model Explainability
for Interpreting Bi-Modal and Encoder-Decoder Transformers" (ICCV 2021; "CheferCAM" in LeGrad).

With the target score s and every block's attention probabilities A_l (B, heads, T, T):

    Ā_l = E_h[(∇_{A_l} s ⊙ A_l)^+]        (eq. 5: gradient-weighted, positive part, head mean)
    R   = I;  R <- R + Ā_l · R  for l = 1..L   (eq. 6, self-attention update rule)

The explanation is R[cls, patches]. Prefix tokens (distillation, registers) take part in R. ``score``
defaults to the target's logit (the authors' code back-propagates one-hot x logits, and CLIP's
``logits_per_image`` = logit_scale x cosine for prompts); the map depends on the score's scale
because R mixes first- and higher-order products of Ā.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..models.base import ViTAdapter
from ..models.layers import LayersLike
from ..models.targets import LOGIT, ScoreKind
from ._attention_utils import CLS_BLOCKS, capture, require_cls, score_kind, to_grid
from .base import MethodKind, MethodResult, register


@register("chefer2", kind=MethodKind.GRADIENT, token_level=True, needs=CLS_BLOCKS, auto_score=LOGIT,
          renamed={"start_layer": "layers"},
          description="Chefer et al. ICCV 2021 generic attention explainability: R += mean_h[(grad A * A)^+] R")
def chefer2(adapter: ViTAdapter, x: Tensor, target=None, *, seed: Optional[int] = 0,
            batch_size: Optional[int] = None, progress: Optional[bool] = None, score: ScoreKind = "auto",
            layers: LayersLike = None) -> MethodResult:
    """Chefer et al. (2021) relevance map.

    Args:
        score: ``"auto"`` (= ``"logit"``, the paper/code), ``"prob"`` or ``"similarity"`` (CLIP prompts).
        layers: the blocks included in the update, first to last (:mod:`vitlens.models.layers`;
            ``None``: every block, the paper).

    Returns:
        :class:`MethodResult` with ``token_maps`` (B, gh, gw): the CLS row of R over the patches;
        ``extras``: the score kind and the blocks used. Needs a CLS token.

    Example::

        >>> exp = vitlens.explain(model, x, "chefer2", target="tabby cat")
    """
    cls = require_cls(adapter, "chefer2")
    blocks = adapter.select_layers(layers, "chefer2")
    cap = capture(adapter, x, target, sites={"attn": blocks}, grad_of=[("attn", l) for l in blocks], score=score)
    B, _, T, _ = cap.values[("attn", blocks[0])].shape
    R = torch.eye(T, device=x.device, dtype=torch.float32).expand(B, T, T)
    for l in blocks:
        a = cap.values[("attn", l)].float()
        g = cap.grads[("attn", l)].float()
        abar = (g * a).clamp(min=0).mean(1)
        R = R + torch.bmm(abar, R)
    return MethodResult(target=cap.target, token_maps=to_grid(adapter, x, R[:, cls]), outputs=cap.outputs,
                        extras={"score": score_kind(score, cap.target), "layers": blocks})
