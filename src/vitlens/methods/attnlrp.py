"""AttnLRP: attention-aware layer-wise relevance propagation (Achtibat, Hatefi, Dreyer, Jain, Wiegand,
Lapuschkin & Samek, "AttnLRP: Attention-Aware Layer-Wise Relevance Propagation for Transformers",
ICML 2024), as one modified backward pass (see :mod:`vitlens.methods._lrp` for the rules):

* linear layers: epsilon rule (``eps=0``, the default, is LRP-0, which is what the authors' efficient
  gradient * input implementation computes; the paper's epsilon is a small stabiliser: pass ``eps>0``);
* LayerNorm: identity rule on the normalisation, i.e. the standard deviation is held constant (as in
  the paper and the authors' code), leaving a linear map;
* GELU / QuickGELU: identity rule (eq. 9);
* softmax: the paper's linearisation with a bias term, R_x = x (R_s - s sum R_s) (Prop. 3.1), which is
  exactly gradient * input through the softmax;
* the products q k^T and A v: uniform rule, half of the relevance to each factor (eq. 7); the query and
  key therefore carry a quarter of the gradient and the value a half, as in the authors' code;
* residual additions: epsilon rule (relevance proportional to the summands).

The explained quantity is the target's logit (CLIP: cosine similarity with the prompt, the norm held
constant). The token map is the relevance of each patch token at the embedded tokens (the input of
block 0: patch embedding + position embedding), summed over channels; relevance is signed and the map
is returned raw (``positive_only=True`` clamps negative evidence to 0 before normalisation).

``conservative=True`` gives CP-LRP (Ali et al., "XAI for Transformers: Better Explanations through
Conservative Propagation", ICML 2022): no relevance through the softmax (q, k detached).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..batching import batch_slices
from ..errors import InputError
from ..models.base import ViTAdapter
from ..models.capabilities import Capability
from ..models.targets import Target
from ._lrp_attnlrp import attnlrp_relevance
from ._lrp_rules import check_lrp_support, lrp_batch_size
from .base import MethodKind, MethodResult, register


@register("attnlrp", kind=MethodKind.RELEVANCE, token_level=True, needs=(Capability.BLOCKS,),
          description="AttnLRP: attention-aware LRP in one modified backward pass (Achtibat et al. 2024)")
def attnlrp(adapter: ViTAdapter, x: Tensor, target=None, *, seed: Optional[int] = 0,
            batch_size: Optional[int] = None, progress: Optional[bool] = None, eps: float = 0.0,
            conservative: bool = False, positive_only: bool = False) -> MethodResult:
    """AttnLRP token relevance.

    Args:
        eps: epsilon of the linear layers' rule (0: LRP-0 / gradient * input, as the authors' efficient
            implementation; the paper uses a small stabiliser).
        conservative: CP-LRP instead of AttnLRP's softmax rule.
        positive_only: clamp negative relevance to 0 (the raw map keeps its sign by default).
    Extras: ``relevance`` (B, T) per-token relevance including prefix tokens, ``score`` the explained
    logit / similarity, ``total`` its sum over tokens.

    Returns:
        :class:`MethodResult` with ``token_maps`` (B, gh, gw): the patch tokens' relevance (signed unless
        ``positive_only``); ``extras``: ``relevance`` (B, T), ``score`` (B,), ``total`` (B,).

    Example::

        >>> exp = vitlens.explain(model, x, "attnlrp", conservative=True)   # CP-LRP
    """
    check_lrp_support(adapter, "attnlrp")
    if eps < 0:
        raise InputError(f"attnlrp eps must be >= 0, got {eps}.")
    B = x.shape[0]
    P = adapter.num_prefix_tokens
    bs = lrp_batch_size(adapter, x, batch_size)
    tgt = None if target is None else adapter.resolve_target(target, batch=B)
    rels, scores, outs, tgts = [], [], [], []
    for sl in batch_slices(B, bs):
        rel, s, tg, out = attnlrp_relevance(adapter, x[sl], None if tgt is None else tgt.select(sl),
                                            eps=eps, conservative=conservative)
        rels.append(rel); scores.append(s); outs.append(out); tgts.append(tg)
    rel = torch.cat(rels)
    gh, gw = adapter.grid_size(x)
    maps = rel[:, P:]
    if positive_only:
        maps = maps.clamp(min=0)
    return MethodResult(target=Target.cat(tgts), token_maps=maps.reshape(B, gh, gw), outputs=torch.cat(outs),
                        extras={"relevance": rel.cpu(), "score": torch.cat(scores).float().cpu(),
                                "total": rel.sum(-1).cpu()})

