"""Adapter for Hugging Face DeiT: ``DeiTForImageClassificationWithTeacher`` (distilled DeiT: the class
and distillation tokens each feed a classifier, the logits are their mean) and
``DeiTForImageClassification`` (classifier on the class token only). Both have two prefix tokens
``["cls", "dist"]`` (Hugging Face's ``DeiTEmbeddings`` always adds the distillation token)."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..errors import UnsupportedModelError
from .base import ViTAdapter
from .hf_vit import add_position, set_hf_metadata


class HFDeiTAdapter(ViTAdapter):
    """Hugging Face DeiT classifiers (with or without the distillation head)."""

    family = "hf"

    def __init__(self, module: nn.Module):
        super().__init__(module)
        m = module
        body = getattr(m, "deit", None)
        if body is None or not hasattr(body, "embeddings") or not hasattr(body.embeddings, "distillation_token"):
            raise UnsupportedModelError(f"{type(m).__name__} is not a Hugging Face DeiT model (needs .deit.embeddings).")
        self.distilled = hasattr(m, "cls_classifier") and hasattr(m, "distillation_classifier")
        if not self.distilled and not hasattr(m, "classifier"):
            raise UnsupportedModelError(f"{type(m).__name__} has no classifier head (use a DeiT image classifier).")
        self.body = body
        set_hf_metadata(self, m, body, prefix_names=["cls", "dist"], mean=(0.485, 0.456, 0.406),
                        std=(0.229, 0.224, 0.225), crop_pct=0.875, interpolation="bicubic")

    def _patches(self, x: Tensor) -> Tensor:
        pe = self.body.embeddings.patch_embeddings
        return pe.projection(x.to(pe.projection.weight.dtype)).flatten(2).transpose(1, 2)

    def embed(self, x: Tensor) -> Tensor:
        emb = self.body.embeddings
        t = self._patches(x)
        B = t.shape[0]
        t = torch.cat([emb.cls_token.expand(B, -1, -1), emb.distillation_token.expand(B, -1, -1), t], dim=1)
        return emb.dropout(add_position(emb, t, x, self.input_size))

    def head(self, tokens: Tensor) -> Tensor:
        m = self.module
        t = self.body.layernorm(tokens)
        if self.distilled:
            return (m.cls_classifier(t[:, 0]) + m.distillation_classifier(t[:, 1])) / 2
        return m.classifier(t[:, 0])

    def embed_parts(self, x: Tensor):
        emb = self.body.embeddings
        t = self._patches(x)
        B = t.shape[0]
        prefix = torch.cat([emb.cls_token.expand(B, -1, -1), emb.distillation_token.expand(B, -1, -1)], dim=1)
        return dict(conv=emb.patch_embeddings.projection, patches=t, prefix=prefix.to(t.dtype),
                    pos=emb.position_embeddings.to(t.dtype), post=None)
