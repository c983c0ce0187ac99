"""Partial LRP (Voita, Talbot, Moiseev, Sennrich & Titov, "Analyzing Multi-Head Self-Attention", ACL
2019), in the form used as a ViT baseline by Chefer et al. (CVPR 2021), whose code later comparison
tables (ViT-CX, LeGrad) build on: the last block's attention weighted by its LRP relevance.

Relevance is propagated from the target (initial relevance 1) through the head and the last block
with the rules of :mod:`vitlens.methods.chefer1` (LRP-alpha1-beta0, normalised residuals and products).

* ``variant="attention_relevance"`` (default; Chefer et al.'s code, "last_layer"): the relevance of
  the last block's attention probabilities R_A (= attention entries weighted by the relevance they
  pass on), positive part, averaged over heads, CLS row over the patch columns.
* ``variant="head_relevance"`` (Voita et al.'s head relevance): each head's attention row weighted by
  the head's relevance (sum of the relevance of its output, clamped at 0):
  sum_h r_h A_h[cls, patches] / sum_h r_h.

Average-pooled models use the mean of the patch rows instead of the CLS row.
"""
from __future__ import annotations

from typing import Literal, Optional

import torch
from torch import Tensor

from ..batching import batch_slices
from ..models.base import ViTAdapter
from ..models.capabilities import Capability
from ..models.targets import Target
from ._lrp_chefer import chefer_propagate, pooled_row
from ._lrp_rules import MatmulRule, check_chefer_support, lrp_batch_size, safe_div
from .base import MethodKind, MethodResult, register


@register("partial_lrp", kind=MethodKind.RELEVANCE, token_level=True, needs=(Capability.BLOCKS,),
          description="Partial LRP: last block's attention weighted by LRP relevance (Voita et al. 2019)")
def partial_lrp(adapter: ViTAdapter, x: Tensor, target=None, *, seed: Optional[int] = 0,
                batch_size: Optional[int] = None, progress: Optional[bool] = None,
                variant: Literal["attention_relevance", "head_relevance"] = "attention_relevance",
                matmul_rule: MatmulRule = "normalize") -> MethodResult:
    """Partial LRP of the last block.

    Args:
        variant: ``"attention_relevance"`` (Chefer et al.'s implementation) or ``"head_relevance"``.
        matmul_rule: ``"normalize"`` (Chefer et al.'s paper) or ``"half"`` (their code).

    Returns:
        :class:`MethodResult` with ``token_maps`` (B, gh, gw): the last block's relevance-weighted attention
        (CLS row, or the mean of the patch rows for average-pooled models); ``extras["variant"]``.

    Example::

        >>> exp = vitlens.explain(model, x, "partial_lrp", variant="head_relevance")
    """
    check_chefer_support(adapter, "partial_lrp")
    B = x.shape[0]
    last = adapter.num_blocks - 1
    tgt = None if target is None else adapter.resolve_target(target, batch=B)
    maps, outs, tgts = [], [], []
    for sl in batch_slices(B, lrp_batch_size(adapter, x, batch_size)):
        res = chefer_propagate(adapter, x[sl], None if tgt is None else tgt.select(sl),
                               matmul_mode=matmul_rule, need_grads=False, down_to=last)
        r_attn = res.rel_attn[last]
        if variant == "attention_relevance":
            mat = r_attn.clamp(min=0).mean(1)
        else:
            w = res.rel_heads[last].sum((2, 3)).clamp(min=0)  # relevance of each head's output A_h v_h
            A = res.records[last].attn.detach()
            mat = safe_div((w[:, :, None, None] * A).sum(1), w.sum(1)[:, None, None])
        maps.append(pooled_row(adapter, mat)); outs.append(res.outputs); tgts.append(res.target)
    gh, gw = adapter.grid_size(x)
    return MethodResult(target=Target.cat(tgts), token_maps=torch.cat(maps).reshape(B, gh, gw),
                        outputs=torch.cat(outs), extras={"variant": variant, "matmul_rule": matmul_rule})

