"""Adapter for open_clip CLIP models with a ``VisionTransformer`` image tower.

Outputs are image embeddings; targets are text prompts (cosine similarity with the prompt's
normalised text embedding) or, when a class vocabulary is set (``class_names`` with a prompt
template, zero-shot classification), class indices scored by ``logit_scale * cosine`` logits.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import Tensor, nn

from ..errors import UnsupportedModelError
from .base import ViTAdapter
from .clip_common import CLIPTextMixin, open_clip_tokenizer, open_clip_visual
from .torchvision_vit import _mha_block_spec

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


class OpenCLIPAdapter(CLIPTextMixin, ViTAdapter):
    """open_clip ``CLIP`` / ``CustomTextCLIP`` whose ``visual`` is an open_clip ``VisionTransformer``."""

    family = "open_clip"

    def __init__(self, module: nn.Module, tokenizer: Optional[Callable] = None,
                 class_names: Optional[Sequence[str]] = None, template: str = "a photo of a {}."):
        super().__init__(module)
        v = open_clip_visual(module)
        for need in ("conv1", "class_embedding", "positional_embedding", "transformer", "ln_post"):
            if not hasattr(v, need):
                raise UnsupportedModelError(
                    f"open_clip image tower {type(v).__name__} is not a VisionTransformer (no '{need}'); "
                    "timm-backed towers (e.g. SigLIP) are handled by OpenCLIPTimmAdapter.")
        if getattr(v, "attn_pool", None) is not None:
            raise UnsupportedModelError("open_clip VisionTransformer with an attentional pooler (CoCa) is not supported.")
        self.visual = v
        specs = []
        for blk in v.transformer.resblocks:
            if not isinstance(getattr(blk, "attn", None), nn.MultiheadAttention) or hasattr(blk, "ln_attn"):
                raise UnsupportedModelError(f"open_clip block {type(blk).__name__} (custom attention) is not supported.")
            mlp = blk.mlp
            specs.append(_mha_block_spec(blk, blk.ln_1, blk.attn, blk.ln_2, mlp, mlp.c_fc, mlp.gelu,
                                         mlp.c_proj, blk.ls_1, blk.ls_2))
        self.blocks = specs
        ps = v.conv1.kernel_size
        self.patch_size = (ps[0], ps[1])
        gs = v.grid_size
        self.input_size = (gs[0] * ps[0], gs[1] * ps[1])
        self.prefix_names = ["cls"]
        self.pool = {"tok": "cls", "avg": "avg"}.get(getattr(v, "pool_type", "tok"), getattr(v, "pool_type", "tok"))
        self.final_ln_after_pool = bool(getattr(v, "final_ln_after_pool", False))
        self.mean, self.std = OPENAI_MEAN, OPENAI_STD
        self.crop_pct = 1.0
        self.interpolation = "bicubic"
        self._init_text(open_clip_tokenizer(module, tokenizer), class_names, template)

    def _text_features(self, prompts: Sequence[str]) -> Tensor:
        tokens = self.tokenizer(list(prompts)).to(self.device)
        return self.module.encode_text(tokens)

    # ---------------------------------------------------------------- forward pieces
    def embed(self, x: Tensor) -> Tensor:
        v = self.visual
        t = v.conv1(x)
        t = t.reshape(t.shape[0], t.shape[1], -1).permute(0, 2, 1)
        cls = v.class_embedding.to(t.dtype).reshape(1, 1, -1).expand(t.shape[0], -1, -1)
        t = torch.cat([cls, t], dim=1) + v.positional_embedding.to(t.dtype)
        t = v.patch_dropout(t)
        return v.ln_pre(t)

    def embed_parts(self, x: Tensor) -> dict:
        """Pieces of :meth:`embed` (``post`` = ``ln_pre``): see :meth:`TimmViTAdapter.embed_parts`."""
        v = self.visual
        t = v.conv1(x)
        t = t.reshape(t.shape[0], t.shape[1], -1).permute(0, 2, 1)
        cls = v.class_embedding.to(t.dtype).reshape(1, 1, -1).expand(t.shape[0], -1, -1)
        return dict(conv=v.conv1, patches=t, prefix=cls, pos=v.positional_embedding.to(t.dtype)[None], post=v.ln_pre)

    def head(self, tokens: Tensor) -> Tensor:
        v = self.visual
        if self.final_ln_after_pool:
            pooled = v.ln_post(tokens[:, 1:].mean(1) if self.pool == "avg" else tokens[:, 0])
        else:
            t = v.ln_post(tokens)
            pooled = t[:, 1:].mean(1) if self.pool == "avg" else t[:, 0]
        return pooled @ v.proj if v.proj is not None else pooled
