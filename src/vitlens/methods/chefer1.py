"""Transformer Attribution (Chefer, Gur & Wolf, "Transformer Interpretability Beyond Attention
Visualization", CVPR 2021; "Chefer1", "CGW1", "Trans. Attrib." in comparison tables).

1. LRP from the output down through every block (:func:`vitlens.methods._lrp.chefer_propagate`,
   Sec. 3.1-3.2 of the paper): initial relevance 1 on the target (a one-hot vector); LRP-alpha1-beta0
   (only positive contributions x_j w_ij) for linear layers; residual additions and the two attention
   products by the Deep Taylor rule for each of their two inputs, followed by the paper's
   normalisation of the pair (each input keeps its share |sum R_u| / (|sum R_u| + |sum R_v|) of the
   output's total); ``matmul_rule="half"`` is the authors' code, which halves each factor's relevance
   instead (for bias-free products both inputs receive the full relevance, so the two coincide);
   LayerNorm, GELU, softmax and layer-scale pass relevance unchanged (the authors' code). The head
   (final norm with constant normaliser, pooling, classifier) is treated as one linear map with the
   z+ rule (see ``head_relevance``): model-agnostic, where the authors' code applies it to the
   classifier weights alone.
2. For each block b: Abar_b = I + E_h[(grad A_b ⊙ R_{A_b})^+], where grad A_b is the gradient of the
   target's logit (CLIP: similarity) w.r.t. the attention probabilities and R_{A_b} their relevance;
   the positive part is taken before the mean over heads.
3. Rollout C = Abar_{L-1} ... Abar_{start}: each new block multiplies on the left (R <- Abar_b R, the
   authors' code), from ``start_layer`` to the last block; the map is C's CLS row over the patch
   columns (average-pooled models: the mean of the patch rows, where the identity adds a constant).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..batching import batch_slices
from ..errors import InputError
from ..models.base import ViTAdapter
from ._lrp import cat_targets, check_chefer_support, chefer_propagate, lrp_batch_size, pooled_row
from .base import MethodResult, register

MATMUL_RULES = ("normalize", "half")


def chefer_rollout(rel_attn: list[Tensor], grads: list[Tensor], start_layer: int = 0) -> Tensor:
    """Eqs. 9-10: (B, T, T) product of I + E_h[(grad ⊙ R)^+] from ``start_layer`` to the last block."""
    C = None
    for r, g in zip(rel_attn[start_layer:], grads[start_layer:]):
        cam = (g * r).clamp(min=0).mean(1)
        eye = torch.eye(cam.shape[-1], dtype=cam.dtype, device=cam.device)
        abar = cam + eye
        C = abar if C is None else abar @ C
    return C


def _check(adapter: ViTAdapter, method: str, matmul_rule: str) -> None:
    check_chefer_support(adapter, method)
    if matmul_rule not in MATMUL_RULES:
        raise InputError(f"{method} matmul_rule must be one of {', '.join(MATMUL_RULES)}, got '{matmul_rule}'.")


@register("chefer1", kind="relevance", token_level=True,
          description="Transformer Attribution: LRP-weighted attention gradients rolled out (Chefer et al. 2021)")
def chefer1(adapter: ViTAdapter, x: Tensor, target=None, *, seed: Optional[int] = 0,
            batch_size: Optional[int] = None, progress: Optional[bool] = None, start_layer: int = 0,
            matmul_rule: str = "normalize") -> MethodResult:
    """Chefer et al.'s Transformer Attribution.

    Args:
        start_layer: first block of the rollout (the authors use 0).
        matmul_rule: ``"normalize"`` (paper eqs. 8-9) or ``"half"`` (authors' code) for the two
            attention products.
    """
    _check(adapter, "chefer1", matmul_rule)
    L = adapter.num_blocks
    if not 0 <= start_layer < L:
        raise InputError(f"chefer1 start_layer must lie in [0, {L}), got {start_layer}.")
    B = x.shape[0]
    tgt = None if target is None else adapter.resolve_target(target, batch=B)
    maps, outs, tgts = [], [], []
    for sl in batch_slices(B, lrp_batch_size(adapter, x, batch_size)):
        res = chefer_propagate(adapter, x[sl], None if tgt is None else tgt.select(sl),
                               matmul_mode=matmul_rule, down_to=start_layer)
        C = chefer_rollout(res.rel_attn, res.grads, start_layer)
        maps.append(pooled_row(adapter, C)); outs.append(res.outputs); tgts.append(res.target)
    gh, gw = adapter.grid_size(x)
    return MethodResult(target=cat_targets(tgts), token_maps=torch.cat(maps).reshape(B, gh, gw),
                        outputs=torch.cat(outs), extras={"start_layer": start_layer, "matmul_rule": matmul_rule})
