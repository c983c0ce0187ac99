"""A canonical pre-norm transformer block that every ViT family is mapped onto.

Each adapter describes its blocks as :class:`BlockSpec` objects that *reference the model's own
modules and parameters* (nothing is copied). :func:`run_block` then evaluates

    h   = norm1(x)
    q, k, v = qkv(h)                               # (B, heads, N, head_dim) each
    A   = softmax(q k^T * scale)                   # attention probabilities (B, heads, N, N)
    x'  = x + ls1(attn_out(A v, h))
    out = x' + ls2(mlp(norm2(x')))

which is exactly the forward pass of timm's ``Block``, torchvision's ``EncoderBlock``, Hugging Face's
``ViTLayer`` and open_clip's ``ResidualAttentionBlock`` in eval mode (tested against each library's
own forward). Because the attention probabilities are computed explicitly here, they can be
captured, replaced or differentiated whatever attention kernel (fused SDPA, eager) the library would
have used. When no hook asks for them, the fused :func:`torch.nn.functional.scaled_dot_product_attention`
kernel is used.

Hook sites (``hooks`` maps a site name to ``fn(layer, tensor) -> tensor | None``; a returned tensor
replaces the value flowing on):

``input`` block input (B, N, D); ``norm1``; ``q``/``k``/``v`` (B, heads, N, hd); ``attn`` the
post-softmax probabilities (B, heads, N, N); ``context`` A·v merged over heads (B, N, heads*hd);
``attn_branch`` the residual branch after projection and layer-scale; ``mid`` x after the attention
residual; ``norm2``; ``mlp_branch``; ``output`` the block output.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal, Mapping, Optional, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Hook = Callable[[int, Tensor], Optional[Tensor]]
#: every hook site of the canonical block, in the order the block reaches them
Site = Literal["input", "norm1", "q", "k", "v", "attn", "context", "attn_branch", "mid", "norm2", "mlp_branch",
               "output"]
SITES: tuple[str, ...] = get_args(Site)
#: the sites whose value is one vector per token of the residual width, (B, T, D): the ``site=`` choices
#: of the methods that read token activations or feature maps (Grad-CAM, Score-CAM, ViT-CX)
FeatureSite = Literal["input", "norm1", "context", "attn_branch", "mid", "norm2", "mlp_branch", "output"]
FEATURE_SITES: tuple[str, ...] = get_args(FeatureSite)


def _identity(x: Tensor) -> Tensor:
    return x


@dataclass
class BlockSpec:
    """References to one block's sub-modules in the canonical pre-norm layout.

    ``qkv(h)`` returns q, k, v shaped (B, heads, N, head_dim) *after* any q/k normalisation;
    ``attn_out(context, h)`` maps the merged context (B, N, heads*hd) to the residual branch before
    layer scale (inner norm, optional gate, output projection). ``modules`` names the underlying
    modules (``norm1``, ``qkv``/``q``/``k``/``v``, ``proj``, ``norm2``, ``fc1``, ``act``, ``fc2``,
    ``ls1``, ``ls2``) for methods such as relevance propagation that need the individual layers.
    """

    norm1: Callable[[Tensor], Tensor]
    qkv: Callable[[Tensor], tuple[Tensor, Tensor, Tensor]]
    attn_out: Callable[[Tensor, Tensor], Tensor]
    norm2: Callable[[Tensor], Tensor]
    mlp: Callable[[Tensor], Tensor]
    num_heads: int
    scale: float
    ls1: Callable[[Tensor], Tensor] = _identity
    ls2: Callable[[Tensor], Tensor] = _identity
    module: Optional[nn.Module] = None
    modules: dict = field(default_factory=dict)


def _tap(hooks: Mapping[str, Hook] | None, site: str, layer: int, value: Tensor) -> Tensor:
    if hooks is not None:
        fn = hooks.get(site)
        if fn is not None:
            out = fn(layer, value)
            if out is not None:
                return out
    return value


def attention_probs(q: Tensor, k: Tensor, scale: float) -> Tensor:
    """softmax(q k^T * scale) over the key axis, computed in float32 for stability."""
    logits = torch.matmul(q * scale, k.transpose(-2, -1))
    return logits.float().softmax(dim=-1).to(q.dtype)


def run_block(spec: BlockSpec, x: Tensor, layer: int = 0,
              hooks: Mapping[str, Hook] | None = None) -> Tensor:
    """Evaluate one block on tokens ``x`` (B, N, D), calling the requested hooks."""
    x = _tap(hooks, "input", layer, x)
    h = _tap(hooks, "norm1", layer, spec.norm1(x))
    q, k, v = spec.qkv(h)
    if hooks:
        q = _tap(hooks, "q", layer, q)
        k = _tap(hooks, "k", layer, k)
        v = _tap(hooks, "v", layer, v)
    B, H, N, hd = q.shape
    if hooks and "attn" in hooks:
        attn = _tap(hooks, "attn", layer, attention_probs(q, k, spec.scale))
        ctx = torch.matmul(attn, v)
    else:
        ctx = F.scaled_dot_product_attention(q, k, v, scale=spec.scale)
    ctx = ctx.transpose(1, 2).reshape(B, N, H * v.shape[-1])
    ctx = _tap(hooks, "context", layer, ctx)
    branch = _tap(hooks, "attn_branch", layer, spec.ls1(spec.attn_out(ctx, h)))
    x = _tap(hooks, "mid", layer, x + branch)
    h2 = _tap(hooks, "norm2", layer, spec.norm2(x))
    branch2 = _tap(hooks, "mlp_branch", layer, spec.ls2(spec.mlp(h2)))
    return _tap(hooks, "output", layer, x + branch2)


def split_heads(t: Tensor, num_heads: int) -> Tensor:
    """(B, N, heads*hd) -> (B, heads, N, hd)."""
    B, N, C = t.shape
    return t.reshape(B, N, num_heads, C // num_heads).transpose(1, 2)


def fused_qkv(linear_weight: Tensor, linear_bias: Tensor | None, num_heads: int,
              q_norm: Callable[[Tensor], Tensor] = _identity,
              k_norm: Callable[[Tensor], Tensor] = _identity) -> Callable[[Tensor], tuple[Tensor, Tensor, Tensor]]:
    """qkv function for a fused (3*D, D) projection laid out as [q; k; v] (timm, torchvision, open_clip)."""

    def qkv(h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        B, N, _ = h.shape
        out = F.linear(h, linear_weight, linear_bias)
        out = out.reshape(B, N, 3, num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = out.unbind(0)
        return q_norm(q), k_norm(k), v

    return qkv


def separate_qkv(q_lin: nn.Module, k_lin: nn.Module, v_lin: nn.Module, num_heads: int):
    """qkv function for separate q/k/v projections (Hugging Face)."""

    def qkv(h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return split_heads(q_lin(h), num_heads), split_heads(k_lin(h), num_heads), split_heads(v_lin(h), num_heads)

    return qkv
