"""Attention rollout (Abnar & Zuidema, "Quantifying Attention Flow in Transformers", ACL 2020).

For every block l (from ``start_layer``), the heads are fused (mean by default), the residual
connection is modelled by adding the identity and the rows are re-normalised,

    Â_l = (A_l + I) / rowsum(A_l + I)        (= 0.5 A_l + 0.5 I for row-stochastic A_l),

and the blocks are multiplied from the first to the last, Ã = Â_L · ... · Â_1 (paper eq. for
Ã(l_i) = A(l_i) Ã(l_{i-1})). The explanation is the CLS row of Ã over the patch columns; all
prefix tokens (distillation, registers) take part in the products.

``discard_ratio`` (not in the paper; from the widely used ``vit-explain`` implementation) sets the
lowest fraction of each fused attention matrix to zero before the identity is added, never the
CLS -> CLS entry. Class-agnostic: the target only labels the result.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..errors import InputError
from ..models.base import ViTAdapter
from ._attention_utils import capture, fuse_heads, layer_index, require_cls, to_grid
from .base import MethodResult, register


def discard_lowest(fused: Tensor, ratio: float, keep_index: int) -> Tensor:
    """Zero the ``floor(ratio * T * T)`` smallest entries of each (T, T) matrix, except the flat
    entry ``keep_index`` (ties: lower flat index first)."""
    B, T, _ = fused.shape
    n = int(ratio * T * T)
    if n <= 0:
        return fused
    flat = fused.reshape(B, T * T).clone()
    order = torch.sort(flat, dim=-1, stable=True).indices
    # the protected entry is skipped: take the n smallest among the others
    order = order[order != keep_index].reshape(B, T * T - 1)[:, :n]
    flat.scatter_(1, order, 0.0)
    return flat.reshape(B, T, T)


@register("rollout", kind="attention", token_level=True,
          description="Attention rollout: product of residual-augmented head-fused attention (Abnar & Zuidema 2020)")
def rollout(adapter: ViTAdapter, x: Tensor, target=None, *, seed: Optional[int] = 0,
            batch_size: Optional[int] = None, progress: Optional[bool] = None, head_fusion: str = "mean",
            discard_ratio: float = 0.0, start_layer: int = 0) -> MethodResult:
    """Attention rollout.

    Args:
        head_fusion: ``"mean"`` (paper), ``"max"`` or ``"min"`` over heads.
        discard_ratio: fraction in [0, 1) of the lowest fused attentions set to zero per block
            (0 = the paper's rollout).
        start_layer: first block multiplied in (0 = all blocks, the paper).
    Needs a CLS token.
    """
    cls = require_cls(adapter, "rollout")
    start = layer_index(adapter, start_layer, "rollout", "start_layer")
    if not 0.0 <= float(discard_ratio) < 1.0:
        raise InputError(f"rollout: discard_ratio must lie in [0, 1), got {discard_ratio}.")
    layers = list(range(start, adapter.num_blocks))
    cap = capture(adapter, x, target, sites={"attn": layers})
    T = cap.values[("attn", layers[0])].shape[-1]
    eye = torch.eye(T, device=x.device, dtype=torch.float32)
    joint = None
    for l in layers:  # loop over blocks (a handful), everything inside is batched
        a = fuse_heads(cap.values[("attn", l)].float(), head_fusion, "rollout")
        a = discard_lowest(a, float(discard_ratio), cls * T + cls)
        a = a + eye
        a = a / a.sum(-1, keepdim=True)
        joint = a if joint is None else torch.bmm(a, joint)
    return MethodResult(target=cap.target, token_maps=to_grid(adapter, x, joint[:, cls]), outputs=cap.outputs,
                        extras={"start_layer": start})
