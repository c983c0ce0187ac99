"""Transformer Attribution (Chefer, Gur & Wolf, "Transformer Interpretability Beyond Attention
Visualization", CVPR 2021; "Chefer1", "CGW1", "Trans. Attrib." in comparison tables).

1. LRP from the output down through every block (:func:`vitlens.methods._lrp_chefer.chefer_propagate`,
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
   authors' code), over the blocks ``layers`` selects (every block by default), first to last; the map is C's CLS row over the patch
   columns (average-pooled models: the mean of the patch rows, where the identity adds a constant).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from ..batching import batch_slices
from ..models.base import ViTAdapter
from ..models.capabilities import Capability
from ..models.layers import LayersLike
from ..models.targets import Target
from ._lrp_chefer import chefer_propagate, pooled_row
from ._lrp_rules import MatmulRule, check_chefer_support, lrp_batch_size
from .base import MethodKind, MethodResult, register


def chefer_rollout(rel_attn: list[Tensor], grads: list[Tensor], blocks: Sequence[int]) -> Tensor:
    """Eqs. 9-10: (B, T, T) product of I + E_h[(grad ⊙ R)^+] over ``blocks``, first to last."""
    C = None
    for b in blocks:
        cam = (grads[b] * rel_attn[b]).clamp(min=0).mean(1)
        eye = torch.eye(cam.shape[-1], dtype=cam.dtype, device=cam.device)
        abar = cam + eye
        C = abar if C is None else abar @ C
    return C


@register("chefer1", kind=MethodKind.RELEVANCE, token_level=True, needs=(Capability.BLOCKS,),
          renamed={"start_layer": "layers"},
          description="Transformer Attribution: LRP-weighted attention gradients rolled out (Chefer et al. 2021)")
def chefer1(adapter: ViTAdapter, x: Tensor, target=None, *, seed: Optional[int] = 0,
            batch_size: Optional[int] = None, progress: Optional[bool] = None, layers: LayersLike = None,
            matmul_rule: MatmulRule = "normalize") -> MethodResult:
    """Chefer et al.'s Transformer Attribution.

    Args:
        layers: the blocks of the rollout (:mod:`vitlens.models.layers`; ``None``: every block, as the
            authors); the LRP pass runs down to the first of them.
        matmul_rule: ``"normalize"`` (paper eqs. 8-9) or ``"half"`` (authors' code) for the two
            attention products.

    Returns:
        :class:`MethodResult` with ``token_maps`` (B, gh, gw): C's CLS row over the patches (average-pooled
        models: the mean of the patch rows); ``extras``: the blocks and the matmul rule.

    Example::

        >>> exp = vitlens.explain(model, x, "chefer1", matmul_rule="half")   # the authors' code
    """
    check_chefer_support(adapter, "chefer1")
    blocks = adapter.select_layers(layers, "chefer1")
    B = x.shape[0]
    tgt = None if target is None else adapter.resolve_target(target, batch=B)
    maps, outs, tgts = [], [], []
    for sl in batch_slices(B, lrp_batch_size(adapter, x, batch_size)):
        res = chefer_propagate(adapter, x[sl], None if tgt is None else tgt.select(sl),
                               matmul_mode=matmul_rule, down_to=blocks[0])
        C = chefer_rollout(res.rel_attn, res.grads, blocks)
        maps.append(pooled_row(adapter, C)); outs.append(res.outputs); tgts.append(res.target)
    gh, gw = adapter.grid_size(x)
    return MethodResult(target=Target.cat(tgts), token_maps=torch.cat(maps).reshape(B, gh, gw),
                        outputs=torch.cat(outs), extras={"layers": blocks, "matmul_rule": matmul_rule})
