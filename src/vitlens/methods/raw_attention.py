"""Raw attention: the CLS token's attention row in one block, averaged over heads (the "raw
attention" baseline of LeGrad, supplementary eq. 11; Chefer et al.'s ``generate_attn``):

    E = mean_h A^L_h[cls, patches]

Class-agnostic: the target only labels the result.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from ..models.base import ViTAdapter
from ._attention_utils import capture, fuse_heads, layer_index, require_cls, to_grid
from .base import MethodResult, register


@register("raw_attention", kind="attention", token_level=True,
          description="CLS-row attention of the last block, mean over heads (LeGrad supp. eq. 11)")
def raw_attention(adapter: ViTAdapter, x: Tensor, target=None, *, seed: Optional[int] = 0,
                  batch_size: Optional[int] = None, progress: Optional[bool] = None, layer: int = -1,
                  head_fusion: str = "mean") -> MethodResult:
    """Raw attention map.

    Args:
        layer: block whose attention is read (default -1, the last block, as in the paper).
        head_fusion: ``"mean"`` over heads (paper), or ``"max"`` / ``"min"``.
    Needs a CLS token (models pooled by averaging raise :class:`UnsupportedModelError`).
    """
    cls = require_cls(adapter, "raw_attention")
    l = layer_index(adapter, layer, "raw_attention")
    cap = capture(adapter, x, target, sites={"attn": [l]})
    fused = fuse_heads(cap.values[("attn", l)].float(), head_fusion, "raw_attention")
    return MethodResult(target=cap.target, token_maps=to_grid(adapter, x, fused[:, cls]), outputs=cap.outputs,
                        extras={"layer": l})
