"""Adapter for torchvision's ``VisionTransformer`` (``vit_b_16``, ``vit_l_32``, ...)."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..errors import UnsupportedModelError
from .base import ViTAdapter
from .blocks import BlockSpec, fused_qkv


def _mha_block_spec(blk: nn.Module, norm1: nn.Module, mha: nn.MultiheadAttention, norm2: nn.Module,
                    mlp: nn.Module, fc1: nn.Module, act: nn.Module, fc2: nn.Module,
                    ls1: nn.Module | None = None, ls2: nn.Module | None = None) -> BlockSpec:
    """BlockSpec for a block built on ``nn.MultiheadAttention`` (torchvision, open_clip)."""
    if not isinstance(mha, nn.MultiheadAttention):
        raise UnsupportedModelError(f"attention module {type(mha).__name__} is not nn.MultiheadAttention.")
    if not mha._qkv_same_embed_dim or mha.in_proj_weight is None:
        raise UnsupportedModelError("nn.MultiheadAttention with separate q/k/v dimensions is not supported.")
    if mha.bias_k is not None or mha.add_zero_attn:
        raise UnsupportedModelError("nn.MultiheadAttention with bias_k/add_zero_attn is not supported.")
    heads = mha.num_heads
    proj = mha.out_proj

    def attn_out(ctx: Tensor, h: Tensor) -> Tensor:
        return proj(ctx)

    ident = nn.Identity()
    return BlockSpec(
        norm1=norm1, norm2=norm2, mlp=mlp,
        qkv=fused_qkv(mha.in_proj_weight, mha.in_proj_bias, heads),
        attn_out=attn_out, num_heads=heads, scale=float((mha.embed_dim // heads) ** -0.5),
        ls1=ls1 if ls1 is not None else ident, ls2=ls2 if ls2 is not None else ident, module=blk,
        modules=dict(norm1=norm1, qkv=mha, proj=proj, norm2=norm2, fc1=fc1, act=act, fc2=fc2,
                     ls1=ls1, ls2=ls2),
    )


class TorchvisionViTAdapter(ViTAdapter):
    """torchvision ``VisionTransformer``: CLS token, learned position embedding, ``heads`` classifier."""

    family = "torchvision"

    def __init__(self, module: nn.Module, class_names=None):
        super().__init__(module)
        m = module
        for need in ("conv_proj", "class_token", "encoder", "heads"):
            if not hasattr(m, need):
                raise UnsupportedModelError(f"{type(m).__name__} is not a torchvision VisionTransformer (no '{need}').")
        specs = []
        for blk in m.encoder.layers:
            mlp = blk.mlp  # MLPBlock: Linear, GELU, Dropout, Linear, Dropout
            specs.append(_mha_block_spec(blk, blk.ln_1, blk.self_attention, blk.ln_2, mlp,
                                         mlp[0], mlp[1], mlp[3]))
        self.blocks = specs
        self.patch_size = (m.patch_size, m.patch_size)
        self.input_size = (m.image_size, m.image_size)
        self.prefix_names = ["cls"]
        self.pool = "cls"
        self.mean = (0.485, 0.456, 0.406)
        self.std = (0.229, 0.224, 0.225)
        self.crop_pct = 224 / 256
        self.interpolation = "bilinear"
        n = m.heads[-1].out_features if isinstance(m.heads[-1], nn.Linear) else None
        if class_names is None and n == 1000:
            from .timm_vit import _imagenet_names
            class_names = _imagenet_names()
        self.class_names = class_names or ([f"class {i}" for i in range(n)] if n else None)

    def embed(self, x: Tensor) -> Tensor:
        m = self.module
        t = m._process_input(x)
        cls = m.class_token.expand(t.shape[0], -1, -1)
        t = torch.cat([cls, t], dim=1)
        return m.encoder.dropout(t + m.encoder.pos_embedding)

    def head(self, tokens: Tensor) -> Tensor:
        m = self.module
        return m.heads(m.encoder.ln(tokens)[:, 0])

    def embed_parts(self, x: Tensor) -> dict:
        """Pieces of :meth:`embed`: see :meth:`TimmViTAdapter.embed_parts`."""
        m = self.module
        t = m._process_input(x)
        return dict(conv=m.conv_proj, patches=t, prefix=m.class_token.expand(t.shape[0], -1, -1).to(t.dtype),
                    pos=m.encoder.pos_embedding.to(t.dtype), post=None)
