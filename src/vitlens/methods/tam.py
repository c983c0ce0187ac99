"""Transition Attention Maps (Yuan, Li, Xiong, Cao & Dou, "Explaining Information Flow Inside Vision
Transformers Using Markov Chain", NeurIPS 2021 XAI4Debugging workshop).

The token states form a Markov chain whose transition matrices are the head-averaged attention
maps with the residual connection as a self-loop; the explained state starts from the last block's
CLS attention row and is propagated back to the first block of ``layers`` (every block by default):

    s = mean_h A_L[cls, :] · (Ā_{L-1} + I) · ... · (Ā_{start} + I)

(the un-normalised ``s ← s·Ā + s`` of the authors' code: one factor 2 per block, which only rescales
the map). It is then weighted by the integrated gradient of the last attention map,

    W = mean_h ( (1/K) Σ_k ∂S(alpha_k x)/∂A_L )^+ [cls, :],  alpha_k ∈ linspace(0, 1, K), K = 20

and the explanation is (s ⊙ W) over the patch columns. S is the target logit (the authors' code
back-propagates one-hot x logits); the TIS paper used 20 steps. The zero input of the path is the
all-zero tensor in the model's normalised space (``x * alpha``, as in the reference code).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..models.base import ViTAdapter
from ..models.layers import LayersLike
from ..models.targets import LOGIT, ScoreKind
from ._attention_utils import CLS_BLOCKS, capture, integrated_attention_gradient, require_cls, score_kind, to_grid
from .base import MethodKind, MethodResult, register


@register("tam", kind=MethodKind.GRADIENT, token_level=True, needs=CLS_BLOCKS, auto_score=LOGIT,
          renamed={"start_layer": "layers"},
          description="Transition Attention Maps: Markov-chain attention state x integrated attention gradient (Yuan et al. 2021)")
def tam(adapter: ViTAdapter, x: Tensor, target=None, *, seed: Optional[int] = 0, batch_size: Optional[int] = None,
        progress: Optional[bool] = None, steps: int = 20, layers: LayersLike = None,
        score: ScoreKind = "auto") -> MethodResult:
    """Transition Attention Map.

    Args:
        steps: number K of points of the integrated-gradient path (20, as in the TIS paper and the
            TAM code), ``alpha`` in ``linspace(0, 1, K)``.
        layers: the blocks of the Markov chain (:mod:`vitlens.models.layers`; ``None``: every block, the
            authors' code); the last block, whose attention gradient weighs the state, always takes part.
        score: ``"auto"`` (= logit, the authors' code), ``"prob"`` or ``"similarity"``.

    Returns:
        :class:`MethodResult` with ``token_maps`` (B, gh, gw); ``extras``: steps, blocks, score kind.
        Needs a CLS token.

    Example::

        >>> exp = vitlens.explain(model, x, "tam", steps=10)
    """
    cls = require_cls(adapter, "tam")
    L = adapter.num_blocks
    last = L - 1
    chain = sorted(set(adapter.select_layers(layers, "tam")) | {last})
    cap = capture(adapter, x, target, sites={"attn": chain}, grad_of=[("attn", last)], score=score)
    state = cap.values[("attn", last)].float().mean(1)[:, cls]  # (B, T)
    for l in reversed(chain[:-1]):  # last - 1 down to the first selected block
        a = cap.values[("attn", l)].float().mean(1)
        state = torch.bmm(state[:, None], a)[:, 0] + state
    ig = integrated_attention_gradient(adapter, x, cap.target, layer=last, steps=steps, score=score,
                                       clean_grad=cap.grads[("attn", last)], batch_size=batch_size,
                                       progress=progress, method="tam")
    w = ig.clamp(min=0).mean(1)[:, cls]
    return MethodResult(target=cap.target, token_maps=to_grid(adapter, x, state * w), outputs=cap.outputs,
                        extras={"steps": int(steps), "layers": chain, "score": score_kind(score, cap.target)})
