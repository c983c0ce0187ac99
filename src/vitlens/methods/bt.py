"""Bidirectional Transformers attribution (Chen, Li, Yu, Xiong & Dou, "Beyond Intuition: Rethinking
Token Attributions inside Transformers", TMLR 2022), in its head-wise (BT-H) and token-wise (BT-T)
forms, named as in InterpretDL and the TIS paper.

*Attentional perception* (the blocks ``layers`` selects, first to last; R starts as the identity):

* BT-H: head weights I_h = mean_{ij} |(A_hᵀ ∇_{A_h} S)_{ij}|, normalised to sum 1 over heads
  (per image); Ā = Σ_h I_h A_h; R ← R + Ā R.
* BT-T: token weights m_j = ‖v_j W_O‖ / ‖z_j‖, with z_j the block's input token and v_j W_O its value
  vector through the attention output projection without bias (times the layer scale if any); the
  head-mean attention is scaled per column, R ← R + (mean_h A) diag(m) R.

*Reasoning feedback*: W = mean_h ( (1/K) Σ_k ∂S(alpha_k x)/∂A_L )^+ with alpha_k ∈ linspace(0, 1, K),
K = 20 (integrated gradient of the last attention map); explanation = (W ⊙ R)[cls, patches] for
BT-H and (W ⊙ |R|)[cls, patches] for BT-T (as in the authors' code).

Defaults follow the authors' code: S = target logit (InterpretDL differentiates the probability:
``score="prob"``), the path baseline is the zero input in normalised space, and the aggregated blocks are
the last 9 of ViT-B's 12: the code starts at block 3 (0-based; ``start_layer=4`` with its
``nb < start_layer - 1`` skip). The default ``layers=0.75`` is that share of the depth (blocks 3..11 of
12; :mod:`vitlens.models.layers`), so other depths keep the same proportion.
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

#: the authors' code aggregates blocks 3..11 of ViT-B's 12 (``start_layer=4`` with ``nb < start_layer - 1``)
AUTHORS_LAYERS = 0.75


def head_weights(a: Tensor, g: Tensor) -> Tensor:
    """BT-H: I_h = mean |A_hᵀ G_h|, normalised over heads. a, g: (B, H, T, T) -> (B, H)."""
    ih = torch.matmul(a.transpose(-1, -2), g).abs().mean((-1, -2))
    total = ih.sum(-1, keepdim=True)
    return ih / torch.where(total > 0, total, torch.ones_like(total))  # an all-zero gradient weighs no head


def _feedback(adapter, x, cap, last, steps, score, batch_size, progress, method) -> Tensor:
    ig = integrated_attention_gradient(adapter, x, cap.target, layer=last, steps=steps, score=score,
                                       clean_grad=cap.grads[("attn", last)], batch_size=batch_size,
                                       progress=progress, method=method)
    return ig.clamp(min=0).mean(1)  # (B, T, T)


@register("bt_head", kind=MethodKind.GRADIENT, token_level=True, needs=CLS_BLOCKS, auto_score=LOGIT,
          renamed={"start_layer": "layers"},
          description="Bidirectional Transformers, head-wise (BT-H; Chen et al. TMLR 2022)")
def bt_head(adapter: ViTAdapter, x: Tensor, target=None, *, seed: Optional[int] = 0,
            batch_size: Optional[int] = None, progress: Optional[bool] = None, steps: int = 20,
            layers: LayersLike = AUTHORS_LAYERS, score: ScoreKind = "auto") -> MethodResult:
    """BT-H map.

    Args:
        steps: points of the integrated-gradient path (20).
        layers: the blocks of the attentional perception (:mod:`vitlens.models.layers`; default 0.75:
            the last 75 % of the blocks, blocks 3..11 of 12 as in the authors' code; ``None``: every block).
        score: ``"auto"`` (= logit, the authors' code), ``"prob"`` (InterpretDL) or ``"similarity"``.

    Returns:
        :class:`MethodResult` with ``token_maps`` (B, gh, gw); ``extras``: steps, blocks, score kind.
        Needs a CLS token.

    Example::

        >>> exp = vitlens.explain(model, x, "bt_head", layers=None)   # every block (TIS's wrapper)
    """
    cls = require_cls(adapter, "bt_head")
    blocks = adapter.select_layers(layers, "bt_head")
    last = adapter.num_blocks - 1
    need = sorted(set(blocks) | {last})  # the last block's attention gradient drives the feedback
    cap = capture(adapter, x, target, sites={"attn": need}, grad_of=[("attn", l) for l in need], score=score)
    B, H, T, _ = cap.values[("attn", last)].shape
    R = torch.eye(T, device=x.device, dtype=torch.float32).expand(B, T, T)
    for l in blocks:
        a = cap.values[("attn", l)].float()
        w = head_weights(a, cap.grads[("attn", l)].float())
        abar = (w[:, :, None, None] * a).sum(1)
        R = R + torch.bmm(abar, R)
    W = _feedback(adapter, x, cap, last, steps, score, batch_size, progress, "bt_head")
    return MethodResult(target=cap.target, token_maps=to_grid(adapter, x, (W * R)[:, cls]), outputs=cap.outputs,
                        extras={"steps": int(steps), "layers": blocks, "score": score_kind(score, cap.target)})


@register("bt_token", kind=MethodKind.GRADIENT, token_level=True, needs=CLS_BLOCKS, auto_score=LOGIT,
          renamed={"start_layer": "layers"},
          description="Bidirectional Transformers, token-wise (BT-T; Chen et al. TMLR 2022)")
def bt_token(adapter: ViTAdapter, x: Tensor, target=None, *, seed: Optional[int] = 0,
             batch_size: Optional[int] = None, progress: Optional[bool] = None, steps: int = 20,
             layers: LayersLike = AUTHORS_LAYERS, score: ScoreKind = "auto") -> MethodResult:
    """BT-T map (parameters as :func:`bt_head`).

    Returns:
        :class:`MethodResult` with ``token_maps`` (B, gh, gw); ``extras``: steps, blocks, score kind.
        Needs a CLS token.

    Example::

        >>> exp = vitlens.explain(model, x, "bt_token", steps=10)
    """
    cls = require_cls(adapter, "bt_token")
    blocks = adapter.select_layers(layers, "bt_token")
    last = adapter.num_blocks - 1
    sites = {"attn": sorted(set(blocks) | {last}), "input": blocks, "norm1": blocks, "v": blocks}
    cap = capture(adapter, x, target, sites=sites, grad_of=[("attn", last)], score=score)
    B, H, T, _ = cap.values[("attn", last)].shape
    R = torch.eye(T, device=x.device, dtype=torch.float32).expand(B, T, T)
    with torch.no_grad():
        for l in blocks:
            spec = adapter.blocks[l]
            v = cap.values[("v", l)]
            vm = v.transpose(1, 2).reshape(B, T, -1)  # heads merged, as the context is
            h = cap.values[("norm1", l)]
            vproj = spec.ls1(spec.attn_out(vm, h) - spec.attn_out(torch.zeros_like(vm), h)).float()
            zn = cap.values[("input", l)].float().norm(dim=-1)
            m = vproj.norm(dim=-1) / torch.where(zn > 0, zn, torch.ones_like(zn))  # (B, T); a zero token: 0
            a = cap.values[("attn", l)].float().mean(1) * m[:, None, :]
            R = R + torch.bmm(a, R)
    W = _feedback(adapter, x, cap, last, steps, score, batch_size, progress, "bt_token")
    return MethodResult(target=cap.target, token_maps=to_grid(adapter, x, (W * R.abs())[:, cls]),
                        outputs=cap.outputs,
                        extras={"steps": int(steps), "layers": blocks, "score": score_kind(score, cap.target)})
