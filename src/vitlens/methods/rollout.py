"""Attention rollout (Abnar & Zuidema, "Quantifying Attention Flow in Transformers", ACL 2020).

For every selected block l (``layers``: every block by default), the heads are fused (mean by default), the residual
connection is modelled by adding the identity and the rows are re-normalised,

    Â_l = (A_l + I) / rowsum(A_l + I)        (= 0.5 A_l + 0.5 I for row-stochastic A_l),

and the blocks are multiplied from the first to the last, Ã = Â_L · ... · Â_1 (paper eq. for
Ã(l_i) = A(l_i) Ã(l_{i-1})). The explanation is the CLS row of Ã over the patch columns; all
prefix tokens (distillation, registers) take part in the products.

``discard_ratio`` (not in the paper; from the widely used ``vit-explain`` implementation) sets the
lowest fraction of each fused attention matrix to zero before the identity is added, never the
CLS -> CLS entry. Class-agnostic: the target only labels the result.

``variant="vit_explain"`` is the code the TIS comparison wrapped (jacobgil/vit-explain at commit
15a81d3, ``vit_rollout.py``, called by TIS's ``comparison_methods/rollout_wrapper.py`` with
``discard_ratio=0.9, head_fusion="mean"``), which differs from the paper's normalisation in three ways:

* discard: the ``int(T * T * ratio)`` smallest entries of the flattened fused matrix are chosen
  (``topk(largest=False)``; ties here in lower-flat-index-first order), then flat index 0 (CLS -> CLS)
  is removed from that set, so one entry fewer is zeroed when it was among them;
* renormalisation ``a = (A + I) / 2; a = a / a.sum(dim=-1)`` on a (1, T, T) tensor: the (1, T) row sums
  broadcast over the *last* axis, so entry (i, j) is divided by the sum of row *j* (a column scaling,
  not a row normalisation);
* the CLS row over the patches is divided by its maximum (``mask / np.max(mask)``).

The raw map of this variant is therefore what the wrapper returned; after vitlens' min-max normalisation
only the first two points change the map.
"""
from __future__ import annotations

from typing import Literal, Optional

import torch
from torch import Tensor

from ..errors import InputError
from ..models.base import ViTAdapter
from ..models.layers import LayersLike
from ._attention_utils import CLS_BLOCKS, HeadFusion, capture, fuse_heads, require_cls, to_grid
from .base import MethodKind, MethodResult, register


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


def discard_vit_explain(fused: Tensor, ratio: float) -> Tensor:
    """vit-explain's discard: zero the ``int(T * T * ratio)`` smallest entries of each flattened (T, T)
    matrix except flat index 0 when it is among them (ties: lower flat index first)."""
    B, T, _ = fused.shape
    n = int(T * T * ratio)
    if n <= 0:
        return fused
    flat = fused.reshape(B, T * T).clone()
    lowest = torch.sort(flat, dim=-1, stable=True).indices[:, :n]
    drop = torch.zeros_like(flat, dtype=torch.bool).scatter_(1, lowest, True)
    drop[:, 0] = False
    return flat.masked_fill(drop, 0.0).reshape(B, T, T)


@register("rollout", kind=MethodKind.ATTENTION, token_level=True, needs=CLS_BLOCKS,
          renamed={"start_layer": "layers"},
          description="Attention rollout: product of residual-augmented head-fused attention (Abnar & Zuidema 2020)")
def rollout(adapter: ViTAdapter, x: Tensor, target=None, *, seed: Optional[int] = 0,
            batch_size: Optional[int] = None, progress: Optional[bool] = None, head_fusion: HeadFusion = "mean",
            discard_ratio: float = 0.0, layers: LayersLike = None,
            variant: Literal["paper", "vit_explain"] = "paper") -> MethodResult:
    """Attention rollout.

    Args:
        head_fusion: ``"mean"`` (paper), ``"max"`` or ``"min"`` over heads.
        discard_ratio: fraction in [0, 1) of the lowest fused attentions set to zero per block
            (0 = the paper's rollout).
        layers: the blocks multiplied in, first to last (:mod:`vitlens.models.layers`; ``None``: every
            block, the paper; ``n``: the last n).
        variant: ``"paper"`` (row-normalised (A + I)) or ``"vit_explain"`` (the vit-explain code TIS
            wrapped; see the module docstring).

    Returns:
        :class:`MethodResult` with ``token_maps`` (B, gh, gw): the CLS row of the rolled-out attention over
        the patches; ``extras["layers"]``: the blocks multiplied in. Needs a CLS token.

    Example::

        >>> exp = vitlens.explain(model, x, "rollout", discard_ratio=0.9, variant="vit_explain")
    """
    cls = require_cls(adapter, "rollout")
    blocks = adapter.select_layers(layers, "rollout")
    if not 0.0 <= float(discard_ratio) < 1.0:
        raise InputError(f"rollout: discard_ratio must lie in [0, 1), got {discard_ratio}.")
    cap = capture(adapter, x, target, sites={"attn": blocks})
    T = cap.values[("attn", blocks[0])].shape[-1]
    eye = torch.eye(T, device=x.device, dtype=torch.float32)
    joint = None
    for l in blocks:  # loop over blocks (a handful), everything inside is batched
        a = fuse_heads(cap.values[("attn", l)].float(), head_fusion)
        if variant == "vit_explain":
            a = discard_vit_explain(a, float(discard_ratio))
            a = (a + eye) / 2
            a = a / a.sum(-1)[:, None, :]  # vit-explain's broadcast: column j / sum of row j
        else:
            a = discard_lowest(a, float(discard_ratio), cls * T + cls)
            a = a + eye
            a = a / a.sum(-1, keepdim=True)
        joint = a if joint is None else torch.bmm(a, joint)
    maps = to_grid(adapter, x, joint[:, cls])
    if variant == "vit_explain":
        maps = maps / maps.reshape(maps.shape[0], -1).max(1).values[:, None, None]
    return MethodResult(target=cap.target, token_maps=maps, outputs=cap.outputs,
                        extras={"layers": blocks, "variant": variant})
