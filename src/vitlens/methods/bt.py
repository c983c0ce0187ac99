"""Bidirectional Transformers attribution (Chen, Li, Yu, Xiong & Dou, "Beyond Intuition: Rethinking
Token Attributions inside Transformers", TMLR 2022), in its head-wise (BT-H) and token-wise (BT-T)
forms, named as in InterpretDL and the TIS paper.

*Attentional perception* (blocks ``start_layer`` .. L, R starts as the identity):

* BT-H: head weights I_h = mean_{ij} |(A_hᵀ ∇_{A_h} S)_{ij}|, normalised to sum 1 over heads
  (per image); Ā = Σ_h I_h A_h; R ← R + Ā R.
* BT-T: token weights m_j = ‖v_j W_O‖ / ‖z_j‖, with z_j the block's input token and v_j W_O its value
  vector through the attention output projection without bias (times the layer scale if any); the
  head-mean attention is scaled per column, R ← R + (mean_h A) diag(m) R.

*Reasoning feedback*: W = mean_h ( (1/K) Σ_k ∂S(alpha_k x)/∂A_L )^+ with alpha_k ∈ linspace(0, 1, K),
K = 20 (integrated gradient of the last attention map); explanation = (W ⊙ R)[cls, patches] for
BT-H and (W ⊙ |R|)[cls, patches] for BT-T (as in the authors' code).

Defaults follow the authors' code: S = target logit (InterpretDL differentiates the probability:
``score="prob"``), the first aggregated block is block 3 (0-based; ``start_layer=4`` with their
``nb < start_layer - 1`` skip), the path baseline is the zero input in normalised space.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..errors import InputError
from ..models.base import ViTAdapter
from ._attention_utils import capture, integrated_attention_gradient, layer_index, require_cls, score_kind, to_grid
from .base import MethodResult, register


def _start(adapter: ViTAdapter, start_layer: int, method: str) -> int:
    if adapter.num_blocks <= start_layer and start_layer >= 0:
        raise InputError(f"{method}: start_layer={start_layer} but the model has {adapter.num_blocks} blocks; "
                         "give a smaller start_layer.")
    return layer_index(adapter, start_layer, method, "start_layer")


def head_weights(a: Tensor, g: Tensor) -> Tensor:
    """BT-H: I_h = mean |A_hᵀ G_h|, normalised over heads. a, g: (B, H, T, T) -> (B, H)."""
    ih = torch.matmul(a.transpose(-1, -2), g).abs().mean((-1, -2))
    return ih / ih.sum(-1, keepdim=True)


def _feedback(adapter, x, cap, last, steps, score, batch_size, progress, method) -> Tensor:
    ig = integrated_attention_gradient(adapter, x, cap.target, layer=last, steps=steps, score=score,
                                       clean_grad=cap.grads[("attn", last)], batch_size=batch_size,
                                       progress=progress, method=method)
    return ig.clamp(min=0).mean(1)  # (B, T, T)


@register("bt_head", kind="gradient", token_level=True,
          description="Bidirectional Transformers, head-wise (BT-H; Chen et al. TMLR 2022)")
def bt_head(adapter: ViTAdapter, x: Tensor, target=None, *, seed: Optional[int] = 0,
            batch_size: Optional[int] = None, progress: Optional[bool] = None, steps: int = 20,
            start_layer: int = 3, score: str = "auto") -> MethodResult:
    """BT-H map.

    Args:
        steps: points of the integrated-gradient path (20).
        start_layer: first block of the attentional perception (0-based; default 3 as in the code).
        score: ``"auto"`` (= logit, the authors' code), ``"prob"`` (InterpretDL) or ``"similarity"``.
    Needs a CLS token.
    """
    cls = require_cls(adapter, "bt_head")
    start = _start(adapter, start_layer, "bt_head")
    last = adapter.num_blocks - 1
    layers = list(range(start, adapter.num_blocks))
    cap = capture(adapter, x, target, sites={"attn": layers}, grad_of=[("attn", l) for l in layers], score=score)
    B, H, T, _ = cap.values[("attn", last)].shape
    R = torch.eye(T, device=x.device, dtype=torch.float32).expand(B, T, T)
    for l in layers:
        a = cap.values[("attn", l)].float()
        w = head_weights(a, cap.grads[("attn", l)].float())
        abar = (w[:, :, None, None] * a).sum(1)
        R = R + torch.bmm(abar, R)
    W = _feedback(adapter, x, cap, last, steps, score, batch_size, progress, "bt_head")
    return MethodResult(target=cap.target, token_maps=to_grid(adapter, x, (W * R)[:, cls]), outputs=cap.outputs,
                        extras={"steps": int(steps), "start_layer": start, "score": score_kind(score)})


@register("bt_token", kind="gradient", token_level=True,
          description="Bidirectional Transformers, token-wise (BT-T; Chen et al. TMLR 2022)")
def bt_token(adapter: ViTAdapter, x: Tensor, target=None, *, seed: Optional[int] = 0,
             batch_size: Optional[int] = None, progress: Optional[bool] = None, steps: int = 20,
             start_layer: int = 3, score: str = "auto") -> MethodResult:
    """BT-T map (parameters as :func:`bt_head`). Needs a CLS token."""
    cls = require_cls(adapter, "bt_token")
    start = _start(adapter, start_layer, "bt_token")
    last = adapter.num_blocks - 1
    layers = list(range(start, adapter.num_blocks))
    sites = {"attn": layers, "input": layers, "norm1": layers, "v": layers}
    cap = capture(adapter, x, target, sites=sites, grad_of=[("attn", last)], score=score)
    B, H, T, _ = cap.values[("attn", last)].shape
    R = torch.eye(T, device=x.device, dtype=torch.float32).expand(B, T, T)
    with torch.no_grad():
        for l in layers:
            spec = adapter.blocks[l]
            v = cap.values[("v", l)]
            vm = v.transpose(1, 2).reshape(B, T, -1)  # heads merged, as the context is
            h = cap.values[("norm1", l)]
            vproj = spec.ls1(spec.attn_out(vm, h) - spec.attn_out(torch.zeros_like(vm), h)).float()
            m = vproj.norm(dim=-1) / cap.values[("input", l)].float().norm(dim=-1)  # (B, T)
            a = cap.values[("attn", l)].float().mean(1) * m[:, None, :]
            R = R + torch.bmm(a, R)
    W = _feedback(adapter, x, cap, last, steps, score, batch_size, progress, "bt_token")
    return MethodResult(target=cap.target, token_maps=to_grid(adapter, x, (W * R.abs())[:, cls]),
                        outputs=cap.outputs,
                        extras={"steps": int(steps), "start_layer": start, "score": score_kind(score)})
