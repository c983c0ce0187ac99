"""Adapter for timm's hierarchical ``SwinTransformer`` (``swin_*`` models).

Swin is not a plain ViT: it has no prefix (CLS) token, its blocks attend inside (shifted) windows,
and the token grid halves at every stage (patch merging). The adapter therefore offers only what
such a model can do:

* :meth:`forward` (the model's own forward, with hooks), :meth:`head`, targets and scores, class
  names, :meth:`preprocess` (timm's eval transform), :meth:`grid_size` (the patch-embedding grid);
* :meth:`feature_maps`: the tokens of any block of any stage as a (B, D, h, w) map, at the sites
  ``input`` (block input), ``norm1`` (normalised input to the window attention), ``attn_branch``
  (output of the window-attention module, back on the spatial grid, before the residual add) and
  ``output`` (block output). Blocks are numbered globally over the stages (stage 0 first); a
  ``(stage, block)`` pair is accepted too. The default is the last block of the second-to-last
  stage, following ViT-CX (Xie et al., 2023) for Swin.

It has no canonical ViT blocks (``blocks == []``), no token subsets, no ``trace`` and no global
attention matrix: methods that need these fail with an :class:`UnsupportedModelError` naming the
model (``adapter.require``), and the corresponding adapter calls raise the same error.
"""
from __future__ import annotations

from typing import Mapping, Optional, Sequence, Union

from torch import Tensor, nn

from ..errors import InputError, UnsupportedModelError
from .base import Trace, ViTAdapter
from .blocks import Hook
from .capabilities import Capability
from .layers import take_one
from .timm_vit import TimmViTAdapter, _timm_class_names

LayerSpec = Union[int, Sequence[int], None]


class TimmSwinAdapter(ViTAdapter):
    """timm ``SwinTransformer`` (``swin_tiny_patch4_window7_224`` and relatives)."""

    family = "timm_swin"
    hierarchical = True
    #: Feature sites available on Swin blocks (a subset of the canonical hook sites).
    FEATURE_SITES = ("input", "norm1", "attn_branch", "output")

    def __init__(self, module: nn.Module):
        super().__init__(module)
        m = module
        for need in ("patch_embed", "layers", "norm", "forward_head"):
            if not hasattr(m, need):
                raise UnsupportedModelError(f"{type(m).__name__} is not a timm SwinTransformer (no '{need}').")
        self.name = m.pretrained_cfg.get("architecture", type(m).__name__) if hasattr(m, "pretrained_cfg") \
            else type(m).__name__
        pe = m.patch_embed
        self.patch_size = tuple(pe.patch_size)
        self.input_size = tuple(pe.img_size) if pe.img_size is not None else (224, 224)
        self.dynamic_size = bool(getattr(m, "dynamic_img_size", False))
        self.prefix_names = []
        self.pool = m.global_pool or "none"
        self.blocks = []  # no canonical pre-norm ViT blocks: windowed attention, patch merging
        #: (stage, index within stage) of every Swin block, in execution order.
        self.swin_blocks: list[tuple[int, int]] = [(s, b) for s, st in enumerate(m.layers)
                                                   for b in range(len(st.blocks))]
        self._modules_by_layer: list[nn.Module] = [st.blocks[b] for st in m.layers for b in range(len(st.blocks))]
        self.stage_depths = [len(st.blocks) for st in m.layers]
        self.stage_heads = [int(st.blocks[0].attn.num_heads) for st in m.layers]
        self.stage_dims = [int(st.blocks[0].dim) for st in m.layers]
        self.embed_dim = self.stage_dims[0]
        cfg = getattr(m, "pretrained_cfg", {}) or {}
        self.mean = tuple(cfg.get("mean", self.mean))
        self.std = tuple(cfg.get("std", self.std))
        self.crop_pct = float(cfg.get("crop_pct", 0.875))
        self.interpolation = cfg.get("interpolation", "bicubic")
        self.class_names = _timm_class_names(m)

    preprocess = TimmViTAdapter.preprocess

    # ------------------------------------------------------------------ metadata
    @property
    def num_heads(self) -> int:
        """Heads of the first stage (each stage has its own count: :attr:`stage_heads`)."""
        return self.stage_heads[0]

    @property
    def num_swin_blocks(self) -> int:
        return len(self.swin_blocks)

    def describe(self) -> str:
        depths = "+".join(str(d) for d in self.stage_depths)
        return (f"timm Swin model '{self.name}' (hierarchical, {depths} windowed-attention blocks in "
                f"{len(self.stage_depths)} stages, patch {self.patch_size[0]}x{self.patch_size[1]}, "
                f"no prefix tokens, pool={self.pool})")

    def _unsupported(self, what: str) -> UnsupportedModelError:
        return UnsupportedModelError(f"{what} is not available for {self.describe()}: Swin has no CLS token, "
                                     "no global attention and no canonical ViT blocks.")

    # ------------------------------------------------------------------ what Swin cannot do
    def run_block(self, layer: int, tokens: Tensor, hooks: Mapping[str, Hook] | None = None) -> Tensor:
        raise self._unsupported("running a single canonical block")

    def run_blocks(self, tokens: Tensor, start: int = 0, end: Optional[int] = None,
                   hooks: Mapping[str, Hook] | None = None) -> Tensor:
        raise self._unsupported("running canonical blocks")

    def forward_subset(self, embedded: Tensor, keep: Tensor, image_index: Optional[Tensor] = None) -> Tensor:
        raise self._unsupported("running the encoder on a subset of tokens")

    def trace(self, x: Tensor, *, tokens: bool = True, attn: bool = False, detach: bool = True) -> Trace:
        raise self._unsupported("tracing per-block tokens and attention")

    # ------------------------------------------------------------------ forward pieces
    def embed(self, x: Tensor) -> Tensor:
        """Patch-embedding tokens (B, N, D) of the first stage (no prefix tokens, no position embedding)."""
        t = self.module.patch_embed(x)
        return t.reshape(t.shape[0], -1, t.shape[-1])

    def head(self, tokens: Tensor) -> Tensor:
        """Final norm + pooling + classifier on last-stage tokens, (B, h, w, D) or (B, N, D)."""
        if tokens.dim() == 3:
            tokens = tokens[:, None]  # (B, 1, N, D): the average pool is over all spatial positions
        m = self.module
        return m.forward_head(m.norm(tokens))

    def resolve_layer(self, layer: LayerSpec) -> int:
        """Global block index from an int (negative counts from the end), a (stage, block) pair or
        ``None`` (:attr:`default_feature_layer`)."""
        n = self.num_swin_blocks
        if layer is None:
            return self.default_feature_layer
        if isinstance(layer, (tuple, list)):
            if len(layer) != 2:
                raise InputError(f"a Swin layer is an int or a (stage, block) pair, got {layer!r}.")
            s, b = int(layer[0]), int(layer[1])
            ns = len(self.stage_depths)
            if not -ns <= s < ns:
                raise InputError(f"stage {s} is out of range: {self.describe()} has {ns} stages.")
            s %= ns
            d = self.stage_depths[s]
            if not -d <= b < d:
                raise InputError(f"block {b} is out of range: stage {s} has {d} blocks.")
            return self.swin_blocks.index((s, b % d))
        layer = int(layer)
        if not -n <= layer < n:
            raise InputError(f"layer {layer} is out of range for {self.describe()} (0..{n - 1} or negative).")
        return layer % n

    def provides(self, cap) -> bool:
        """Swin gives feature maps of any block (:meth:`feature_maps`) but none of the other capabilities."""
        cap = Capability(cap)
        return cap is Capability.FEATURE_MAPS or (cap is not Capability.TOKEN_SUBSETS and super().provides(cap))

    def select_layer(self, layers, method: str = "", name: str = "layers") -> int:
        """The one Swin block ``layers`` selects (:mod:`vitlens.models.layers` over the Swin blocks in
        execution order, or ``[(stage, block)]``); ``None``: :attr:`default_feature_layer`."""
        if layers is None:
            return self.default_feature_layer
        if isinstance(layers, (list, tuple)) and len(layers) == 1 and isinstance(layers[0], (list, tuple)):
            return self.resolve_layer(layers[0])
        return take_one(layers, self.num_swin_blocks, self.default_feature_layer, method=method, name=name)

    @property
    def default_feature_layer(self) -> int:
        """The last block of the second-to-last stage (ViT-CX's choice for Swin)."""
        stage = max(len(self.stage_depths) - 2, 0)
        return self.swin_blocks.index((stage, self.stage_depths[stage] - 1))

    def _site_module(self, layer: int, site: str) -> tuple[nn.Module, bool]:
        """The module whose output (or input, for ``pre=True``) is the value at ``site``."""
        blk = self._modules_by_layer[layer]
        if site == "input":
            return blk, True
        if site == "norm1":
            return blk.norm1, False
        if site == "attn_branch":
            # block: x + drop_path1(_attn(norm1(x))); drop_path1 (Identity in eval) receives the
            # window-attention output merged back onto the (B, H, W, C) grid
            return blk.drop_path1, False
        if site == "output":
            return blk, False
        raise InputError(f"hook site '{site}' is not available on Swin blocks; use one of "
                         f"{', '.join(self.FEATURE_SITES)}.")

    def forward(self, x: Tensor, hooks: Mapping[str, Hook] | None = None) -> Tensor:
        """The model's own forward pass; ``hooks`` (site -> fn(layer, (B, N, D) tokens)) are called
        for every Swin block at the sites of :attr:`FEATURE_SITES`; a returned tensor replaces the value."""
        if not hooks:
            return self.module(x)
        handles = []
        try:
            for site, fn in hooks.items():
                for layer in range(self.num_swin_blocks):
                    mod, pre = self._site_module(layer, site)
                    handles.append(_register(mod, pre, layer, fn))
            return self.module(x)
        finally:
            for h in handles:
                h.remove()

    __call__ = forward

    def feature_maps(self, x: Tensor, layer: LayerSpec = None, site: str = "output") -> tuple[Tensor, Tensor]:
        """One forward pass returning ``(outputs, features)``: features (B, D, h, w) of Swin block
        ``layer`` (see :meth:`resolve_layer`) at ``site``, on that stage's own token grid."""
        if site not in self.FEATURE_SITES:
            raise InputError(f"feature site '{site}' is not available on Swin blocks; use one of "
                             f"{', '.join(self.FEATURE_SITES)}.")
        layer = self.resolve_layer(layer)
        mod, pre = self._site_module(layer, site)
        got: list[Tensor] = []

        def grab(_m, args, out=None):
            got.append(args[0] if pre else out)

        h = mod.register_forward_pre_hook(grab) if pre else mod.register_forward_hook(grab)
        try:
            outputs = self.module(x)
        finally:
            h.remove()
        f = got[0]  # (B, h, w, D)
        return outputs, f.permute(0, 3, 1, 2)


def _register(mod: nn.Module, pre: bool, layer: int, fn: Hook):
    """Attach a canonical-style hook (tokens as (B, N, D)) to a module working on (B, H, W, D)."""

    def call(t: Tensor) -> Optional[Tensor]:
        shape = t.shape
        out = fn(layer, t.reshape(shape[0], -1, shape[-1]))
        return None if out is None else out.reshape(shape)

    if pre:
        def pre_hook(_m, args):
            out = call(args[0])
            return None if out is None else (out,) + tuple(args[1:])
        return mod.register_forward_pre_hook(pre_hook)

    def post_hook(_m, _args, out):
        return call(out)
    return mod.register_forward_hook(post_hook)
