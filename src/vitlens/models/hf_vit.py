"""Adapter for Hugging Face ``ViTForImageClassification`` (and ``DeiTForImageClassification``-like
models sharing the ViT layer layout). Supports the transformers 4.x (``encoder.layer``,
``attention.attention.query``) and 5.x (``layers``, ``attention.q_proj``) module layouts."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..errors import UnsupportedModelError
from .base import ViTAdapter
from .blocks import BlockSpec, separate_qkv


def _hf_layer_spec(layer: nn.Module, num_heads: int) -> BlockSpec:
    att = layer.attention
    if hasattr(att, "q_proj"):  # transformers >= 5
        q, k, v, proj = att.q_proj, att.k_proj, att.v_proj, att.o_proj
        fc1, act, fc2 = layer.mlp.fc1, layer.mlp.activation_fn, layer.mlp.fc2
        mlp = layer.mlp
    elif hasattr(att, "attention") and hasattr(att.attention, "query"):  # transformers 4.x
        q, k, v = att.attention.query, att.attention.key, att.attention.value
        proj = att.output.dense
        fc1, act, fc2 = layer.intermediate.dense, layer.intermediate.intermediate_act_fn, layer.output.dense

        def mlp(h: Tensor) -> Tensor:
            return fc2(act(fc1(h)))
    else:
        raise UnsupportedModelError(f"Hugging Face layer {type(layer).__name__} has no recognised attention layout.")

    def attn_out(ctx: Tensor, h: Tensor) -> Tensor:
        return proj(ctx)

    return BlockSpec(
        norm1=layer.layernorm_before, norm2=layer.layernorm_after, mlp=mlp,
        qkv=separate_qkv(q, k, v, num_heads), attn_out=attn_out, num_heads=num_heads,
        scale=float((q.out_features // num_heads) ** -0.5), module=layer,
        modules=dict(norm1=layer.layernorm_before, q=q, k=k, v=v, proj=proj,
                     norm2=layer.layernorm_after, fc1=fc1, act=act, fc2=fc2),
    )


def add_position(emb: nn.Module, t: Tensor, x: Tensor, input_size: tuple) -> Tensor:
    """Tokens ``t`` (prefix + patches) plus the HF embeddings' position encoding, interpolated when the
    image ``x`` is not the model's ``input_size`` (``interpolate_pos_encoding``, as HF's forward does)."""
    h, w = x.shape[-2:]
    if (h, w) != tuple(input_size):
        return t + emb.interpolate_pos_encoding(t, h, w)
    return t + emb.position_embeddings


def set_hf_metadata(adapter: ViTAdapter, m: nn.Module, body: nn.Module, *, prefix_names: list, mean: tuple,
                    std: tuple, crop_pct: float, interpolation: str) -> None:
    """The adapter fields every Hugging Face ViT-layout classifier shares: blocks (:func:`_hf_layer_spec` of
    ``body``'s layers, 4.x or 5.x layout), patch and input size from ``m.config``, prefix tokens, CLS
    pooling, name, eval transform and the class names of ``config.id2label``."""
    cfg = m.config
    layers = getattr(body, "layers", None)  # transformers >= 5
    if layers is None:
        layers = body.encoder.layer
    adapter.blocks = [_hf_layer_spec(layer, cfg.num_attention_heads) for layer in layers]
    ps, isz = cfg.patch_size, cfg.image_size
    adapter.patch_size = (ps, ps) if isinstance(ps, int) else tuple(ps)
    adapter.input_size = (isz, isz) if isinstance(isz, int) else tuple(isz)
    adapter.prefix_names = list(prefix_names)
    adapter.pool = "cls"
    adapter.name = getattr(cfg, "_name_or_path", "") or type(m).__name__
    adapter.mean, adapter.std, adapter.crop_pct, adapter.interpolation = mean, std, crop_pct, interpolation
    id2label = getattr(cfg, "id2label", None) or {}
    adapter.class_names = [str(id2label.get(i, id2label.get(str(i), f"class {i}"))) for i in range(cfg.num_labels)]


class HFViTAdapter(ViTAdapter):
    """Hugging Face ``ViTForImageClassification``: CLS token, classifier on the CLS token."""

    family = "hf"

    def __init__(self, module: nn.Module):
        super().__init__(module)
        m = module
        body = getattr(m, "vit", None) or getattr(m, "deit", None)
        if body is None or not hasattr(body, "embeddings") or not hasattr(m, "classifier"):
            raise UnsupportedModelError(f"{type(m).__name__} is not a Hugging Face ViT image classifier "
                                        "(needs .vit.embeddings and .classifier).")
        self.body = body
        if hasattr(body.embeddings, "distillation_token"):
            raise UnsupportedModelError("a Hugging Face DeiT model has a distillation token: wrap it with "
                                        "vitlens.wrap_model (it picks the DeiT adapter).")
        set_hf_metadata(self, m, body, prefix_names=["cls"], mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
                        crop_pct=1.0, interpolation="bilinear")

    def embed(self, x: Tensor) -> Tensor:
        emb = self.body.embeddings
        t = emb.patch_embeddings(x.to(emb.patch_embeddings.projection.weight.dtype))
        cls = emb.cls_token.expand(t.shape[0], -1, -1)
        t = torch.cat([cls, t], dim=1)
        return emb.dropout(add_position(emb, t, x, self.input_size))

    def head(self, tokens: Tensor) -> Tensor:
        return self.module.classifier(self.body.layernorm(tokens)[:, 0])

    def embed_parts(self, x: Tensor) -> dict:
        """Pieces of :meth:`embed`: see :meth:`TimmViTAdapter.embed_parts`."""
        emb = self.body.embeddings
        conv = emb.patch_embeddings.projection
        t = conv(x.to(conv.weight.dtype)).flatten(2).transpose(1, 2)
        return dict(conv=conv, patches=t, prefix=emb.cls_token.expand(t.shape[0], -1, -1).to(t.dtype),
                    pos=emb.position_embeddings.to(t.dtype), post=None)
