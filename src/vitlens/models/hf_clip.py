"""Adapters for Hugging Face ``CLIPModel`` and ``SiglipModel`` (vision tower + text tower; text prompts
are targets). Supports the transformers 4.x and 5.x module layouts.

* ``CLIPModel``: ``get_image_features`` = ``visual_projection(post_layernorm(h[:, 0]))`` with
  ``h = encoder(pre_layrnorm(embeddings(x)))``; one CLS token.
* ``SiglipModel``: ``get_image_features`` = ``head(post_layernorm(encoder(embeddings(x))))`` where
  ``head`` is the multi-head attentional pooler (a learned probe attending to every patch token,
  ``nn.MultiheadAttention``, then a residual MLP); no prefix tokens, ``pool == "map"``.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import UnsupportedModelError
from .base import ViTAdapter
from .blocks import BlockSpec, attention_probs, separate_qkv
from .clip_common import CLIPTextMixin

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def hf_encoder_layer_spec(layer: nn.Module, num_heads: int) -> BlockSpec:
    """BlockSpec of a CLIP/SigLIP ``EncoderLayer``: ``layer_norm1 -> self_attn(q/k/v/out_proj)``,
    ``layer_norm2 -> mlp(fc1, activation_fn, fc2)``, pre-norm residuals."""
    att = getattr(layer, "self_attn", None)
    mlp = getattr(layer, "mlp", None)
    if att is None or mlp is None or not all(hasattr(att, n) for n in ("q_proj", "k_proj", "v_proj", "out_proj")):
        raise UnsupportedModelError(f"Hugging Face layer {type(layer).__name__} has no recognised "
                                    "self_attn (q/k/v/out_proj) + mlp layout.")
    q, k, v, proj = att.q_proj, att.k_proj, att.v_proj, att.out_proj
    hd = q.out_features // num_heads
    scale = float(getattr(att, "scale", hd ** -0.5))

    def attn_out(ctx: Tensor, h: Tensor) -> Tensor:
        return proj(ctx)

    return BlockSpec(
        norm1=layer.layer_norm1, norm2=layer.layer_norm2, mlp=mlp,
        qkv=separate_qkv(q, k, v, num_heads), attn_out=attn_out, num_heads=num_heads, scale=scale,
        module=layer,
        modules=dict(norm1=layer.layer_norm1, q=q, k=k, v=v, proj=proj, norm2=layer.layer_norm2,
                     fc1=mlp.fc1, act=mlp.activation_fn, fc2=mlp.fc2),
    )


def _features(out) -> Tensor:
    """transformers 5 returns a ModelOutput from ``get_*_features``; 4.x a tensor."""
    return out if isinstance(out, Tensor) else out.pooler_output


class _HFDualEncoder:
    """Shared text side of the Hugging Face dual encoders."""

    def _text_features(self, prompts: Sequence[str]) -> Tensor:
        tok = self.tokenizer
        if hasattr(tok, "model_input_names"):  # a transformers tokenizer / processor
            enc = tok(list(prompts), padding=self._padding, truncation=True, return_tensors="pt")
        else:
            enc = tok(list(prompts))
        if isinstance(enc, Tensor):
            enc = {"input_ids": enc}
        enc = {k: v.to(self.device) for k, v in dict(enc).items()
               if k in ("input_ids", "attention_mask", "position_ids")}
        return _features(self.module.get_text_features(**enc))


def _vision_parts(module: nn.Module, kind: str):
    vm = getattr(module, "vision_model", None)
    if vm is None or not hasattr(module, "get_text_features"):
        raise UnsupportedModelError(f"{type(module).__name__} is not a Hugging Face {kind} dual encoder "
                                    "(needs .vision_model and get_text_features).")
    vm = getattr(vm, "vision_model", vm)  # 4.x: CLIPVisionTransformer directly; wrappers nest it
    enc = getattr(vm, "encoder", None)
    layers = getattr(enc, "layers", None) if enc is not None else None
    if layers is None or not hasattr(vm, "embeddings"):
        raise UnsupportedModelError(f"the vision tower of {type(module).__name__} has no encoder.layers.")
    return vm, layers


class HFCLIPAdapter(_HFDualEncoder, CLIPTextMixin, ViTAdapter):
    """Hugging Face ``CLIPModel``: CLS token, ``post_layernorm`` + ``visual_projection`` on it."""

    family = "hf"

    def __init__(self, module: nn.Module, tokenizer: Optional[Callable] = None,
                 class_names: Optional[Sequence[str]] = None, template: str = "a photo of a {}."):
        ViTAdapter.__init__(self, module)
        vm, layers = _vision_parts(module, "CLIP")
        if not hasattr(module, "visual_projection") or not hasattr(vm, "pre_layrnorm"):
            raise UnsupportedModelError(f"{type(module).__name__} is not a Hugging Face CLIPModel.")
        cfg = vm.config if hasattr(vm, "config") else module.config.vision_config
        self.vision = vm
        self.blocks = [hf_encoder_layer_spec(l, cfg.num_attention_heads) for l in layers]
        ps = cfg.patch_size
        self.patch_size = (ps, ps)
        self.input_size = (cfg.image_size, cfg.image_size)
        self.prefix_names = ["cls"]
        self.pool = "cls"
        self.name = getattr(module.config, "_name_or_path", "") or type(module).__name__
        self.mean, self.std = CLIP_MEAN, CLIP_STD
        self.crop_pct = 1.0
        self.interpolation = "bicubic"
        self._padding = True
        self._init_text(tokenizer, class_names, template)

    def embed(self, x: Tensor) -> Tensor:
        vm = self.vision
        emb = vm.embeddings
        t = emb.patch_embedding(x.to(emb.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
        cls = emb.class_embedding.to(t.dtype).expand(t.shape[0], 1, -1)
        t = torch.cat([cls, t], dim=1)
        h, w = x.shape[-2:]
        pos = emb.interpolate_pos_encoding(t, h, w) if (h, w) != self.input_size else emb.position_embedding.weight[None]
        return vm.pre_layrnorm(t + pos.to(t.dtype))

    def head(self, tokens: Tensor) -> Tensor:
        return self.module.visual_projection(self.vision.post_layernorm(tokens[:, 0]))

    def embed_parts(self, x: Tensor):
        emb = self.vision.embeddings
        t = emb.patch_embedding(x.to(emb.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
        cls = emb.class_embedding.to(t.dtype).expand(t.shape[0], 1, -1)
        return dict(conv=emb.patch_embedding, patches=t, prefix=cls,
                    pos=emb.position_embedding.weight[None].to(t.dtype), post=self.vision.pre_layrnorm)


class HFSiglipAdapter(_HFDualEncoder, CLIPTextMixin, ViTAdapter):
    """Hugging Face ``SiglipModel`` (and SigLIP 2 checkpoints with the same layout at a fixed resolution):
    no prefix tokens, attentional pooler head."""

    family = "hf"

    def __init__(self, module: nn.Module, tokenizer: Optional[Callable] = None,
                 class_names: Optional[Sequence[str]] = None, template: str = "a photo of a {}."):
        ViTAdapter.__init__(self, module)
        vm, layers = _vision_parts(module, "SigLIP")
        head = getattr(vm, "head", None)
        if head is None or not isinstance(getattr(head, "attention", None), nn.MultiheadAttention):
            raise UnsupportedModelError(f"{type(module).__name__}: the SigLIP vision tower has no attentional "
                                        "pooling head (vision_use_head=False is not supported).")
        if not hasattr(vm.embeddings, "patch_embedding") or not isinstance(vm.embeddings.patch_embedding, nn.Conv2d):
            raise UnsupportedModelError("SigLIP vision embeddings without a Conv2d patch embedding (e.g. NaFlex "
                                        "SigLIP 2) are not supported.")
        cfg = vm.config if hasattr(vm, "config") else module.config.vision_config
        self.vision = vm
        self.pooler = head
        self.blocks = [hf_encoder_layer_spec(l, cfg.num_attention_heads) for l in layers]
        ps = cfg.patch_size
        self.patch_size = (ps, ps)
        self.input_size = (cfg.image_size, cfg.image_size)
        self.prefix_names = []
        self.pool = "map"
        self.name = getattr(module.config, "_name_or_path", "") or type(module).__name__
        self.mean, self.std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
        self.crop_pct = 1.0
        self.interpolation = "bicubic"
        self._padding = "max_length"  # SigLIP was trained on max-length padded text
        self._init_text(tokenizer, class_names, template)

    pool_prefix_columns = 0

    def embed(self, x: Tensor) -> Tensor:
        emb = self.vision.embeddings
        t = emb.patch_embedding(x.to(emb.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
        h, w = x.shape[-2:]
        pos = emb.interpolate_pos_encoding(t, h, w) if (h, w) != self.input_size else emb.position_embedding.weight[None]
        return t + pos.to(t.dtype)

    def head(self, tokens: Tensor) -> Tensor:
        return self.pooler(self.vision.post_layernorm(tokens))

    def head_with_pool_attention(self, tokens: Tensor, attn_hook=None, final_norm: bool = True) -> Tensor:
        """:meth:`head` with the pooler's attention (B, heads, 1, N) computed explicitly and offered to
        ``attn_hook`` (which may return a replacement); ``final_norm=False`` skips ``post_layernorm``
        (the pooler input of LeGrad's released SigLIP code)."""
        p = self.pooler
        mha = p.attention
        x = self.vision.post_layernorm(tokens) if final_norm else tokens
        B, N, D = x.shape
        H = mha.num_heads
        hd = D // H
        w, b = mha.in_proj_weight, mha.in_proj_bias
        probe = p.probe.expand(B, -1, -1)
        L = probe.shape[1]
        q = F.linear(probe, w[:D], None if b is None else b[:D]).reshape(B, L, H, hd).transpose(1, 2)
        k = F.linear(x, w[D:2 * D], None if b is None else b[D:2 * D]).reshape(B, N, H, hd).transpose(1, 2)
        v = F.linear(x, w[2 * D:], None if b is None else b[2 * D:]).reshape(B, N, H, hd).transpose(1, 2)
        probs = attention_probs(q, k, hd ** -0.5)
        if attn_hook is not None:
            out = attn_hook(probs)
            probs = probs if out is None else out
        y = (probs @ v).transpose(1, 2).reshape(B, L, D)
        y = mha.out_proj(y)
        y = y + p.mlp(p.layernorm(y))
        return y[:, 0]

    def embed_parts(self, x: Tensor):
        emb = self.vision.embeddings
        t = emb.patch_embedding(x.to(emb.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
        return dict(conv=emb.patch_embedding, patches=t, prefix=t[:, :0],
                    pos=emb.position_embedding.weight[None].to(t.dtype), post=None)
