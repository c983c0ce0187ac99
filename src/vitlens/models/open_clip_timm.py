"""Adapter for open_clip models whose image tower is a ``TimmModel`` wrapping a timm
``VisionTransformer`` trunk: SigLIP and SigLIP 2 (``ViT-B-16-SigLIP``, ``ViT-SO400M-14-SigLIP2``, ...:
no class token, attentional pooler ``global_pool='map'``, no extra projection) and the other
timm-tower CLIPs (average pool + linear projection).

The image embedding is ``visual.head(trunk.forward_head(trunk.norm(blocks(embed(x)))))``, exactly
open_clip's ``TimmModel.forward``. Blocks, patch grid and prefix tokens are the trunk's (read through
:class:`~vitlens.models.timm_vit.TimmViTAdapter`); text prompts go through the model's own text tower.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

from torch import Tensor, nn

from ..errors import UnsupportedModelError
from .base import ViTAdapter
from .clip_common import CLIPTextMixin, open_clip_tokenizer, open_clip_visual
from .timm_vit import TimmViTAdapter


class OpenCLIPTimmAdapter(CLIPTextMixin, ViTAdapter):
    """open_clip ``CLIP`` / ``CustomTextCLIP`` with a timm ViT image tower (SigLIP, SigLIP 2)."""

    family = "open_clip"

    def __init__(self, module: nn.Module, tokenizer: Optional[Callable] = None,
                 class_names: Optional[Sequence[str]] = None, template: str = "a photo of a {}."):
        super().__init__(module)
        v = open_clip_visual(module)
        trunk = getattr(v, "trunk", None)
        if trunk is None or not hasattr(v, "head"):
            raise UnsupportedModelError(f"open_clip image tower {type(v).__name__} is not a TimmModel (no 'trunk').")
        if not type(trunk).__module__.startswith("timm.") or not hasattr(trunk, "_pos_embed"):
            raise UnsupportedModelError(
                f"the timm trunk {type(trunk).__name__} of this open_clip model is not a timm VisionTransformer "
                "(ConvNeXt / other towers are not supported).")
        self.visual = v
        self.trunk = TimmViTAdapter(trunk)
        t = self.trunk
        self.blocks = t.blocks
        self.patch_size, self.input_size, self.dynamic_size = t.patch_size, t.input_size, t.dynamic_size
        self.prefix_names = list(t.prefix_names)
        self.pool = t.pool
        self.mean, self.std = t.mean, t.std
        self.crop_pct = 1.0  # open_clip's eval transform: resize shortest side + centre crop at the input size
        self.interpolation = "bicubic"
        self.name = f"open_clip/{t.name}"
        self._init_text(open_clip_tokenizer(module, tokenizer), class_names, template)

    def _text_features(self, prompts: Sequence[str]) -> Tensor:
        tokens = self.tokenizer(list(prompts)).to(self.device)
        return self.module.encode_text(tokens)

    # ---------------------------------------------------------------- forward pieces
    def embed(self, x: Tensor) -> Tensor:
        return self.trunk.embed(x)

    def head(self, tokens: Tensor) -> Tensor:
        return self.visual.head(self.trunk.head(tokens))

    @property
    def pool_prefix_columns(self) -> int:
        return self.trunk.pool_prefix_columns

    def head_with_pool_attention(self, tokens: Tensor, attn_hook=None, final_norm: bool = True) -> Tensor:
        """:meth:`TimmViTAdapter.head_with_pool_attention` of the trunk, then open_clip's head."""
        return self.visual.head(self.trunk.head_with_pool_attention(tokens, attn_hook, final_norm))

    def embed_parts(self, x: Tensor):
        return self.trunk.embed_parts(x)
