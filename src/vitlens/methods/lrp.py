"""Full LRP at the input pixels: the "LRP" baseline of Chefer, Gur & Wolf (CVPR 2021, Table 1-3) and of
LeGrad's Table 1 (Binder et al. 2016 rules as implemented by Chefer et al.).

Reference: hila-chefer/Transformer-Explainability, ``baselines/ViT/ViT_explanation_generator.py``
``LRP.generate_LRP(..., method="full")`` -> ``ViT_LRP.py`` ``VisionTransformer.relprop`` branch
``method == "full"``; rules in ``modules/layers_ours.py``. Read as:

1. Relevance from the head down through every block exactly as for Transformer Attribution
   (:func:`vitlens.methods._lrp.chefer_propagate`: initial relevance on the target, z+ rule
   (alpha=1, beta=0) for linear layers, Chefer's normalised rule for residual additions and the two
   attention products, identity for LayerNorm / GELU / softmax) -> relevance R at the tokens entering
   block 0.
2. A norm applied after the position embedding (open_clip's ``ln_pre``, timm's ``norm_pre``): identity
   (``LayerNorm.relprop`` returns R unchanged).
3. Position embedding ``z = u + p`` (``self.add`` in ``VisionTransformer.forward``): ``Add.relprop``:
   ``R_u = u * R / z``, ``R_p = p * R / z``, each rescaled to keep its share ``|sum R_u| / (|sum R_u| +
   |sum R_p|)`` of ``sum R`` (per image); ``R_u`` goes on, the class/prefix tokens are dropped
   (``cam[:, 1:]``).
4. Patch embedding (``Conv2d.relprop`` with 3 input channels): the z^B rule (Montavon et al. 2017)
   with per-image bounds ``l = min x``, ``h = max x`` over channels and pixels:
   ``R_i = sum_j c_ij / (sum_i' c_i'j + 1e-9) * R_j``, ``c_ij = x_i w_ij - l w+_ij - h w-_ij``
   (bias ignored), computed with transposed convolutions.
5. The map is the relevance summed over the colour channels (``cam.sum(dim=1)``), one value per
   pixel (B, H, W).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..batching import batch_slices
from ..models.base import ViTAdapter
from ..models.capabilities import Capability
from ..models.targets import Target
from ._lrp_chefer import chefer_propagate
from ._lrp_rules import MatmulRule, add_rule, check_chefer_support, lrp_batch_size
from .base import MethodKind, MethodResult, register


def zb_conv_relevance(conv: torch.nn.Conv2d, x: Tensor, r: Tensor, stabiliser: float = 1e-9) -> Tensor:
    """z^B rule through a patch-embedding convolution (``layers_ours.Conv2d.relprop`` for 3 input
    channels): relevance ``r`` (B, D, gh, gw) of the convolution's output -> (B, 3, H, W)."""
    w = conv.weight.to(x.dtype)
    wp, wn = w.clamp(min=0), w.clamp(max=0)
    lo = x.amin(dim=(1, 2, 3), keepdim=True).expand_as(x)
    hi = x.amax(dim=(1, 2, 3), keepdim=True).expand_as(x)
    kw = dict(stride=conv.stride, padding=conv.padding)
    za = F.conv2d(x, w, **kw) - F.conv2d(lo, wp, **kw) - F.conv2d(hi, wn, **kw) + stabiliser
    s = r / za
    out_pad = [x.shape[-2 + i] - ((za.shape[-2 + i] - 1) * conv.stride[i] - 2 * conv.padding[i] + conv.kernel_size[i])
               for i in range(2)]
    back = dict(stride=conv.stride, padding=conv.padding, output_padding=tuple(out_pad))
    return (x * F.conv_transpose2d(s, w, **back) - lo * F.conv_transpose2d(s, wp, **back)
            - hi * F.conv_transpose2d(s, wn, **back))


def input_relevance(adapter: ViTAdapter, x: Tensor, rel_tokens: Tensor) -> Tensor:
    """Steps 2-5: relevance at the tokens entering block 0 (B, P+N, D) -> pixel map (B, H, W)."""
    parts = adapter.embed_parts(x)
    u = torch.cat([parts["prefix"], parts["patches"]], 1).detach()
    pos = parts["pos"].detach().expand_as(u)
    r_u, _ = add_rule(u.to(rel_tokens.dtype), pos.to(rel_tokens.dtype), rel_tokens)
    P = adapter.num_prefix_tokens
    gh, gw = adapter.grid_size(x)
    r_patch = r_u[:, P:].transpose(1, 2).reshape(x.shape[0], -1, gh, gw)
    return zb_conv_relevance(parts["conv"], x.to(r_patch.dtype), r_patch).sum(1)


@register("lrp", kind=MethodKind.RELEVANCE, token_level=False,
          needs=(Capability.BLOCKS, Capability.PATCH_EMBEDDING),
          description="Full LRP relevance at the input pixels (Chefer et al. 2021's 'LRP' baseline)")
def lrp(adapter: ViTAdapter, x: Tensor, target=None, *, seed: Optional[int] = 0,
        batch_size: Optional[int] = None, progress: Optional[bool] = None,
        matmul_rule: MatmulRule = "normalize") -> MethodResult:
    """Full LRP (pixel-level relevance summed over colour channels; deterministic, ``seed`` unused).

    Args:
        matmul_rule: ``"normalize"`` (paper) or ``"half"`` (authors' code) for the attention products
            (identical for bias-free products, see :mod:`vitlens.methods.chefer1`).

    Returns:
        :class:`MethodResult` with ``maps`` (B, H, W): the relevance at the input pixels, summed over the colour
        channels; ``extras["matmul_rule"]``.

    Example::

        >>> exp = vitlens.explain(model, x, "lrp")
    """
    check_chefer_support(adapter, "lrp")
    B = x.shape[0]
    tgt = None if target is None else adapter.resolve_target(target, batch=B)
    maps, outs, tgts = [], [], []
    for sl in batch_slices(B, lrp_batch_size(adapter, x, batch_size)):
        res = chefer_propagate(adapter, x[sl], None if tgt is None else tgt.select(sl),
                               matmul_mode=matmul_rule, need_grads=False, down_to=0)
        with torch.no_grad():
            maps.append(input_relevance(adapter, x[sl], res.rel_tokens))
        outs.append(res.outputs); tgts.append(res.target)
    return MethodResult(target=Target.cat(tgts), maps=torch.cat(maps), outputs=torch.cat(outs),
                        extras={"matmul_rule": matmul_rule})
