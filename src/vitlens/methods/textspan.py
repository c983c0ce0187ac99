"""TextSpan spatial maps (Gandelsman, Efros & Steinhardt, "Interpreting CLIP's Image Representation
via Text-Based Decomposition", ICLR 2024, sec. 5 "decomposition into image tokens").

The CLIP image embedding is the projected, layer-normalised CLS token of the residual stream, a sum
of direct contributions. With the final LayerNorm treated as linear (its per-image standard deviation
sigma fixed), the contribution of source token j through head h of block l is

    c_{l,h,j} = P^T [ gamma ⊙ centre( W_O^h · A^l_h[cls, j] · v^l_{h,j} ) ] / sigma

(times the block's layer scale, if any; centre() removes the channel mean, which is how the LayerNorm
acts linearly; the output-projection bias belongs to no token and is left out). The map for the
target direction t is

    E_j = Σ_{l in layers} Σ_h < c_{l,h,j}, t > / ||y||

i.e. each image token's direct effect on the cosine similarity between the image embedding y and the
prompt's text embedding t (for class targets of a CLIP model with a vocabulary, t is the class's
prompt embedding; for a CLS-pooled *classifier* the same decomposition is read on the target class's
logit, t = one-hot and no division by ||y|| -- an extension of the paper to classifiers).

``layers``: the paper shows that the direct effects are concentrated in the last 4 attention
layers (the earlier ones can be mean-ablated) and decomposes those (``layers=4``, the last 4); ``layers=None`` sums all
layers, as the authors' segmentation script does. The authors' code spreads the final LayerNorm's
mean removal evenly over all components instead of centring each one; this changes each token's
value by a term proportional to its channel mean -- we centre each contribution (the exact linear
action of the LayerNorm). Their segmentation script also subtracts the mean over the ImageNet
classes; here ``contrast="class_mean"`` does the same over the model's class vocabulary.

The final norm and projection are used only through ``adapter.head``: for a head of the form
affine ∘ LayerNorm ∘ (CLS selection), the linear map P^T(gamma ⊙ centre(c)) equals
(head(K·ĉ) - head(0)) · std(c) with ĉ = centre(c)/std(c) and a large K (so the norm's epsilon is
negligible), and sigma follows from the CLS token itself. Needs a CLS-pooled model.
"""
from __future__ import annotations

from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..models.base import ViTAdapter
from ..models.capabilities import Capability
from ..models.layers import LayersLike
from ._attention_utils import capture, require_cls, to_grid
from .base import MethodKind, MethodResult, register

_K = 1.0e3


def head_linear(adapter: ViTAdapter, c: Tensor) -> Tensor:
    """P^T(gamma ⊙ centre(c)) for rows c (M, D), through ``adapter.head`` (see the module docstring)."""
    D = c.shape[-1]
    cen = c - c.mean(-1, keepdim=True)
    std = cen.pow(2).mean(-1, keepdim=True).sqrt()
    safe = torch.where(std > 0, std, torch.ones_like(std))
    u = cen / safe * _K
    zero = adapter.head(torch.zeros(1, 1, D, device=c.device, dtype=c.dtype)).float()
    out = adapter.head(u[:, None, :]).float() - zero
    return out * torch.where(std > 0, std, torch.zeros_like(std)).float()


def _direction(adapter: ViTAdapter, tgt, outputs: Tensor) -> tuple[Tensor, bool]:
    """Explained direction in output space and whether it is a CLIP cosine (divide by ||y||)."""
    B = outputs.shape[0]
    if adapter.supports_text:
        if tgt.any_text:
            return tgt.text.to(outputs.device).float(), True
        names = [adapter.class_names[i] for i in tgt.index.tolist()]
        template = getattr(adapter, "template", "{}")
        return adapter.encode_text([template.format(n) for n in names]).to(outputs.device).float(), True
    return F.one_hot(tgt.index.to(outputs.device), outputs.shape[-1]).float().reshape(B, -1), False


@register("textspan", kind=MethodKind.ATTENTION, token_level=True,
          needs=(Capability.BLOCKS, Capability.CLS), renamed={"n_layers": "layers"},
          description="TextSpan: direct effect of each image token through the last layers' heads on the prompt "
                      "(Gandelsman et al. ICLR 2024)")
def textspan(adapter: ViTAdapter, x: Tensor, target=None, *, seed: Optional[int] = 0,
             batch_size: Optional[int] = None, progress: Optional[bool] = None, layers: LayersLike = 4,
             contrast: Literal["none", "class_mean"] = "none") -> MethodResult:
    """TextSpan spatial map.

    Args:
        layers: the blocks whose heads are decomposed (:mod:`vitlens.models.layers`; 4: the last 4, the
            paper's analysis; ``None``: every block, the authors' segmentation script).
        contrast: ``"none"`` (the map for the target direction) or ``"class_mean"`` (minus the mean map
            over the model's class vocabulary, as the authors' segmentation script).

    Returns:
        :class:`MethodResult` with ``token_maps`` (B, gh, gw); ``extras``: the blocks and the contrast.
        Needs a CLS-pooled model (CLIP image towers, ``global_pool='token'`` classifiers).

    Example::

        >>> exp = vitlens.explain(clip, x, "textspan", target="a photo of a dog", layers=None)
    """
    cls = require_cls(adapter, "textspan")
    adapter.require("CLS-token pooling (the embedding must be the normalised CLS token)", adapter.pool == "cls",
                    "textspan")
    adapter.require("a head on the CLS token alone (distilled DeiT averages two token heads)",
                    not getattr(adapter, "distilled", False), "textspan")
    L = adapter.num_blocks
    blocks = adapter.select_layers(layers, "textspan")
    cap = capture(adapter, x, target, sites={"attn": blocks, "v": blocks, "norm1": blocks, "output": [L - 1]})
    tgt, y = cap.target, cap.outputs.float()
    with torch.no_grad():
        B = x.shape[0]
        total = None
        for l in blocks:  # a few blocks; everything inside is batched
            spec = adapter.blocks[l]
            a = cap.values[("attn", l)]  # (B, H, T, T)
            v = cap.values[("v", l)]  # (B, H, T, hd)
            T = v.shape[2]
            ctx = (a[:, :, cls, :, None] * v).transpose(1, 2).reshape(B, T, -1)  # per source token j
            hq = cap.values[("norm1", l)][:, cls:cls + 1].expand(B, T, -1)  # the CLS query's normed input
            comp = spec.ls1(spec.attn_out(ctx, hq) - spec.attn_out(torch.zeros_like(ctx), hq))
            total = comp if total is None else total + comp
        D = total.shape[-1]
        contrib = head_linear(adapter, total.reshape(B * T, D)).reshape(B, T, -1)  # (B, T, E), times sigma
        xl = cap.values[("output", L - 1)][:, cls]
        lin_final = head_linear(adapter, xl)
        zero = adapter.head(torch.zeros(1, 1, D, device=x.device, dtype=xl.dtype)).float()
        den = (adapter.head(xl[:, None]).float() - zero).norm(dim=-1)
        sigma = torch.where(den > 0, lin_final.norm(dim=-1) / torch.where(den > 0, den, torch.ones_like(den)),
                            torch.ones_like(den))  # a head that outputs nothing (zero weights): no rescaling
        contrib = contrib / sigma[:, None, None]
        d, cosine = _direction(adapter, tgt, y)
        emap = (contrib * d[:, None, :]).sum(-1)
        if contrast == "class_mean":
            adapter.require("a class vocabulary (for contrast='class_mean')", adapter.num_classes is not None,
                            "textspan")
            if adapter.supports_text:
                template = getattr(adapter, "template", "{}")
                allt = adapter.encode_text([template.format(c) for c in adapter.class_names]).float()
                emap = emap - (contrib @ allt.to(contrib.device).T).mean(-1)
            else:
                emap = emap - contrib.mean(-1)
        if cosine:
            emap = emap / y.norm(dim=-1, keepdim=True)
    return MethodResult(target=tgt, token_maps=to_grid(adapter, x, emap), outputs=cap.outputs,
                        extras={"layers": blocks, "contrast": contrast})
