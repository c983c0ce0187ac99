"""Raw attention: the CLS token's attention row in one block, averaged over heads (the "raw
attention" baseline of LeGrad, supplementary eq. 11; Chefer et al.'s ``generate_attn``):

    E = mean_h A^L_h[cls, patches]

Class-agnostic: the target only labels the result.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from ..models.base import ViTAdapter
from ..models.layers import LayersLike
from ._attention_utils import CLS_BLOCKS, HeadFusion, capture, fuse_heads, require_cls, to_grid
from .base import MethodKind, MethodResult, register


@register("raw_attention", kind=MethodKind.ATTENTION, token_level=True, needs=CLS_BLOCKS,
          renamed={"layer": "layers"},
          description="CLS-row attention of the last block, mean over heads (LeGrad supp. eq. 11)")
def raw_attention(adapter: ViTAdapter, x: Tensor, target=None, *, seed: Optional[int] = 0,
                  batch_size: Optional[int] = None, progress: Optional[bool] = None, layers: LayersLike = None,
                  head_fusion: HeadFusion = "mean") -> MethodResult:
    """Raw attention map.

    Args:
        layers: the one block whose attention is read (:mod:`vitlens.models.layers`; ``None``: the last
            block, as in the paper; ``[k]``: block k).
        head_fusion: ``"mean"`` over heads (paper), or ``"max"`` / ``"min"``.

    Returns:
        :class:`MethodResult` with ``token_maps`` (B, gh, gw): the CLS row's attention over the patches;
        ``extras["layer"]``, the block read. Needs a CLS token (models pooled by averaging raise
        :class:`UnsupportedModelError`).

    Example::

        >>> exp = vitlens.explain(model, x, "raw_attention", layers=[-2])   # the second-to-last block
    """
    cls = require_cls(adapter, "raw_attention")
    l = adapter.select_layer(layers, "raw_attention")
    cap = capture(adapter, x, target, sites={"attn": [l]})
    fused = fuse_heads(cap.values[("attn", l)].float(), head_fusion)
    return MethodResult(target=cap.target, token_maps=to_grid(adapter, x, fused[:, cls]), outputs=cap.outputs,
                        extras={"layer": l})
