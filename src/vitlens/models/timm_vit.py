"""Adapter for timm's ``VisionTransformer`` family: ViT, DeiT (incl. distilled), register-token
variants (``*_reg*``), global-pool variants (``global_pool='avg'``), and attentional-pool (``map``)
heads such as SigLIP's."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..errors import UnsupportedModelError
from .base import ViTAdapter
from .blocks import BlockSpec, fused_qkv


def _timm_block_spec(blk: nn.Module) -> BlockSpec:
    attn = getattr(blk, "attn", None)
    missing = [n for n in ("norm1", "attn", "norm2", "mlp") if not hasattr(blk, n)]
    if missing or not hasattr(attn, "qkv") or not hasattr(attn, "proj"):
        raise UnsupportedModelError(
            f"timm block {type(blk).__name__} is not a pre-norm ViT block with a fused qkv projection "
            f"(missing: {', '.join(missing) or 'attn.qkv/attn.proj'}).")
    if type(blk).__name__ not in ("Block", "LayerScaleBlock") and not hasattr(blk, "ls1"):
        raise UnsupportedModelError(f"timm block type {type(blk).__name__} is not supported (parallel or "
                                    "post-norm blocks have a different residual layout).")
    if getattr(attn, "q_bias", None) is not None:
        raise UnsupportedModelError("timm attention with separate q/v biases (BEiT-style) is not supported.")
    heads = attn.num_heads
    inner_norm = getattr(attn, "norm", nn.Identity())
    gate = getattr(attn, "gate", None)
    proj = attn.proj

    def attn_out(ctx: Tensor, h: Tensor) -> Tensor:
        ctx = inner_norm(ctx)
        if gate is not None:
            ctx = ctx * gate(h).sigmoid()
        return proj(ctx)

    qkv_lin = attn.qkv
    return BlockSpec(
        norm1=blk.norm1, norm2=blk.norm2, mlp=blk.mlp,
        qkv=fused_qkv(qkv_lin.weight, qkv_lin.bias, heads, attn.q_norm, attn.k_norm),
        attn_out=attn_out, num_heads=heads, scale=float(attn.scale),
        ls1=getattr(blk, "ls1", nn.Identity()), ls2=getattr(blk, "ls2", nn.Identity()),
        module=blk,
        modules=dict(norm1=blk.norm1, qkv=qkv_lin, proj=proj, norm2=blk.norm2,
                     fc1=getattr(blk.mlp, "fc1", None), act=getattr(blk.mlp, "act", None),
                     fc2=getattr(blk.mlp, "fc2", None), ls1=getattr(blk, "ls1", None),
                     ls2=getattr(blk, "ls2", None), attn_norm=inner_norm),
    )


class TimmViTAdapter(ViTAdapter):
    """timm ``VisionTransformer`` (and ``VisionTransformerDistilled``)."""

    family = "timm"

    def __init__(self, module: nn.Module):
        super().__init__(module)
        m = module
        for need in ("patch_embed", "blocks", "_pos_embed", "forward_head"):
            if not hasattr(m, need):
                raise UnsupportedModelError(f"{type(m).__name__} is not a timm VisionTransformer (no '{need}').")
        self.blocks = [_timm_block_spec(b) for b in m.blocks]
        self.name = m.pretrained_cfg.get("architecture", type(m).__name__) if hasattr(m, "pretrained_cfg") else type(m).__name__
        pe = m.patch_embed
        self.patch_size = tuple(pe.patch_size)
        self.input_size = tuple(pe.img_size) if pe.img_size is not None else (224, 224)
        self.dynamic_size = bool(getattr(m, "dynamic_img_size", False))
        n_reg = getattr(m, "num_reg_tokens", 0) or 0
        names: list[str] = []
        if getattr(m, "cls_token", None) is not None:
            names.append("cls")
        if getattr(m, "dist_token", None) is not None:
            names.append("dist")
        names += [f"reg{i}" for i in range(n_reg)]
        if len(names) != m.num_prefix_tokens:
            raise UnsupportedModelError(f"cannot name the {m.num_prefix_tokens} prefix tokens of {self.name}.")
        self.prefix_names = names
        self.pool = "map" if getattr(m, "attn_pool", None) is not None else (
            "cls" if m.global_pool == "token" else m.global_pool or "none")
        self.distilled = getattr(m, "dist_token", None) is not None
        cfg = getattr(m, "pretrained_cfg", {}) or {}
        self.mean = tuple(cfg.get("mean", self.mean))
        self.std = tuple(cfg.get("std", self.std))
        self.crop_pct = float(cfg.get("crop_pct", 0.875))
        self.interpolation = cfg.get("interpolation", "bicubic")
        self.class_names = _timm_class_names(m)

    def preprocess(self, images) -> Tensor:
        """timm's own eval transform for this model (``resolve_data_config`` + ``create_transform``)."""
        from timm.data import create_transform, resolve_data_config

        from .preprocess import preprocess_images

        tf = create_transform(**resolve_data_config({}, model=self.module))
        return preprocess_images(images, self.input_size, self.mean, self.std, transform=tf).to(self.device)

    def embed(self, x: Tensor) -> Tensor:
        m = self.module
        t = m.patch_embed(x)
        t = m._pos_embed(t)
        t = m.patch_drop(t) if hasattr(m, "patch_drop") else t
        return m.norm_pre(t) if hasattr(m, "norm_pre") else t

    def head(self, tokens: Tensor) -> Tensor:
        m = self.module
        return m.forward_head(m.norm(tokens))

    def embed_parts(self, x: Tensor) -> dict:
        """The pieces of :meth:`embed` (for relevance propagation down to the pixels): ``conv`` the
        patch-embedding convolution, ``patches`` its flattened output (B, N, D), ``prefix`` the prefix
        tokens (B, P, D) before the position embedding, ``pos`` (1, P+N, D) the added position
        embedding (zeros where none is added) and ``post`` the norm applied after the sum (or None).
        ``embed(x) == post(cat(prefix, patches) + pos)``."""
        m = self.module
        pe = m.patch_embed
        if self.dynamic_size or not isinstance(getattr(pe, "norm", nn.Identity()), nn.Identity) \
                or not isinstance(getattr(pe, "proj", None), nn.Conv2d):
            raise UnsupportedModelError(f"{self.describe()}: relevance to the pixels needs a plain Conv2d patch "
                                        "embedding at a fixed input size.")
        t = pe(x)
        B, N, D = t.shape
        pre = [tok.expand(B, -1, -1) for tok in (getattr(m, "cls_token", None), getattr(m, "dist_token", None),
                                                 getattr(m, "reg_token", None)) if tok is not None]
        prefix = torch.cat(pre, 1) if pre else t[:, :0]
        P = prefix.shape[1]
        if m.pos_embed is None:
            pos = torch.zeros(1, P + N, D, dtype=t.dtype, device=t.device)
        elif getattr(m, "no_embed_class", False):
            pos = torch.cat([torch.zeros(1, P, D, dtype=t.dtype, device=t.device), m.pos_embed.to(t.dtype)], 1)
        else:
            pos = m.pos_embed.to(t.dtype)
        post = getattr(m, "norm_pre", None)
        return dict(conv=pe.proj, patches=t, prefix=prefix.to(t.dtype), pos=pos,
                    post=None if post is None or isinstance(post, nn.Identity) else post)

    # ------------------------------------------------------------------ attentional pooler (additive)
    @property
    def pool_prefix_columns(self) -> int:
        """How many prefix tokens lead the columns of the pooler's attention (0 when timm drops them
        before pooling, the default)."""
        m = self.module
        return self.num_prefix_tokens if getattr(m, "pool_include_prefix", False) else 0

    def head_with_pool_attention(self, tokens: Tensor, attn_hook=None, final_norm: bool = True) -> Tensor:
        """:meth:`head` for ``pool == "map"`` models (timm ``AttentionPoolLatent``, as in SigLIP) with
        the pooler's attention computed explicitly.

        ``attn_hook(probs)`` receives the pooler's post-softmax attention (B, heads, latent_len, N_in)
        (``N_in`` = the tokens fed to the pooler: patch tokens, led by :attr:`pool_prefix_columns`
        prefix tokens) and may return a replacement (e.g. a leaf that requires grad). Equal to
        :meth:`head` up to float error; nothing is modified in place. ``final_norm=False`` feeds the
        pooler the tokens without the trunk's final norm (what LeGrad's released SigLIP code does,
        ``legrad/wrapper.py`` ``compute_legrad_siglip``: ``attn_pool(blk.feat_post_mlp)``).
        """
        from .blocks import attention_probs

        m = self.module
        pool = getattr(m, "attn_pool", None)
        if pool is None:
            raise UnsupportedModelError(f"{self.describe()} has no attentional pooler (pool='{self.pool}').")
        x = m.norm(tokens) if final_norm else tokens
        if not getattr(m, "pool_include_prefix", False):
            x = x[:, self.num_prefix_tokens:]
        B, N, C = x.shape
        if pool.pos_embed is not None:
            x = x + pool.pos_embed.unsqueeze(0).to(x.dtype)
        H, hd, L = pool.num_heads, pool.head_dim, pool.latent_len
        q = pool.q(pool.latent.expand(B, -1, -1)).reshape(B, L, H, hd).transpose(1, 2)
        k, v = pool.kv(x).reshape(B, N, 2, H, hd).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = pool.q_norm(q), pool.k_norm(k)
        probs = attention_probs(q, k, pool.scale)
        if attn_hook is not None:
            out = attn_hook(probs)
            probs = probs if out is None else out
        y = (probs @ v).transpose(1, 2).reshape(B, L, H * hd)
        y = pool.proj_drop(pool.proj(y))
        if pool.mlp is not None:
            y = y + pool.mlp(pool.norm(y))
        if pool.pool == "token":
            y = y[:, 0]
        elif pool.pool == "avg":
            y = y.mean(1)
        y = m.head_drop(m.fc_norm(y))
        return m.head(y)


def _imagenet_names() -> list[str]:
    """The 1000 ImageNet-1k class descriptions in index order (from timm's bundled metadata)."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo("imagenet-1k")
    return [info.index_to_description(i) for i in range(1000)]


def _timm_class_names(m: nn.Module):
    n = getattr(m, "num_classes", 0)
    if not n:
        return None
    try:
        from timm.data import ImageNetInfo, infer_imagenet_subset

        subset = infer_imagenet_subset(m)
        if subset:
            info = ImageNetInfo(subset)
            if info.num_classes() == n:
                return [info.index_to_description(i) for i in range(n)]
    except Exception:  # pragma: no cover - older timm
        pass
    return [f"class {i}" for i in range(n)]
