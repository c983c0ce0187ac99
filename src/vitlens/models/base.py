"""The adapter interface every explanation method talks to.

Methods never touch timm / torchvision / transformers / open_clip internals: they ask a
:class:`ViTAdapter` for the patch grid, the prefix tokens, the embedded tokens, per-block outputs and
attention probabilities (via hooks on the canonical block of :mod:`vitlens.models.blocks`), a run of
the encoder on a subset of patch tokens, and the target score. A new model family is one subclass
that fills in :meth:`embed`, :meth:`head`, :attr:`blocks` and the metadata.

Target resolution and scores live in :mod:`.target_resolution`, the compiled forward paths in
:mod:`.compiled` (both mixins of :class:`ViTAdapter`); what an adapter provides is named by
:class:`~vitlens.models.capabilities.Capability` (:meth:`ViTAdapter.provides`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

from .._validate import check_images
from ..errors import InputError, UnsupportedModelError
from .blocks import FEATURE_SITES, BlockSpec, Hook, run_block
from .capabilities import Capability, describe_need
from .compiled import CompiledPaths
from .layers import LayersLike, take_indices, take_one
from .target_resolution import TargetResolution


@dataclass
class Trace:
    """What one recorded forward pass saw.

    ``tokens[l]`` is the output of block ``l`` (B, P+N, D) (all prefix tokens included),
    ``attn[l]`` its attention probabilities (B, heads, P+N, P+N), ``outputs`` the model output
    (logits, or the image embedding for CLIP-style models), ``embedded`` the tokens entering block 0.
    """

    outputs: Tensor
    embedded: Tensor
    tokens: list[Tensor] = field(default_factory=list)
    attn: list[Tensor] = field(default_factory=list)


class ViTAdapter(CompiledPaths, TargetResolution):
    """Uniform view of a Vision Transformer.

    Attributes filled in by subclasses:
        module: the wrapped ``nn.Module`` (unchanged; put in eval mode).
        family: short family name (``"timm"``, ``"torchvision"``, ``"hf"``, ``"open_clip"``).
        patch_size: (ph, pw) in pixels.
        input_size: default (H, W) of the model.
        dynamic_size: whether other input sizes are accepted (position embeddings are resampled).
        prefix_names: names of the prefix tokens in order, e.g. ``["cls", "dist"]`` or
            ``["cls", "reg0", ..]``; empty for models without prefix tokens.
        pool: how the head pools tokens: ``"cls"`` (a prefix token), ``"avg"`` (mean of patch tokens),
            ``"map"`` (attentional pooler), ...
        blocks: canonical description of each transformer block.
        class_names: one display name per output class, or ``None``.
        mean, std: the normalisation of :meth:`preprocess` (per channel).
    """

    family: str = "generic"
    supports_text: bool = False

    def __init__(self, module: nn.Module):
        self.module = module
        module.eval()
        self.patch_size: tuple[int, int] = (16, 16)
        self.input_size: tuple[int, int] = (224, 224)
        self.dynamic_size: bool = False
        self.prefix_names: list[str] = []
        self.pool: str = "cls"
        self.blocks: list[BlockSpec] = []
        self.class_names: Optional[list[str]] = None
        self.mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
        self.std: tuple[float, float, float] = (0.5, 0.5, 0.5)
        self.crop_pct: float = 0.875
        self.interpolation: str = "bicubic"
        self.name: str = type(module).__name__

    # ------------------------------------------------------------------ metadata
    @property
    def num_prefix_tokens(self) -> int:
        return len(self.prefix_names)

    @property
    def cls_index(self) -> Optional[int]:
        """Position of the CLS token in the sequence, or ``None`` when the model has none."""
        return self.prefix_names.index("cls") if "cls" in self.prefix_names else None

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_heads(self) -> int:
        return self.blocks[0].num_heads

    @property
    def device(self) -> torch.device:
        for p in self.module.parameters():
            return p.device
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        for p in self.module.parameters():
            return p.dtype
        return torch.float32

    def grid_size(self, x_or_size: Tensor | Sequence[int] | None = None) -> tuple[int, int]:
        """Patch grid (gh, gw) for an input batch or an (H, W) size (default: the model's input size)."""
        if x_or_size is None:
            h, w = self.input_size
        elif isinstance(x_or_size, Tensor):
            h, w = x_or_size.shape[-2:]
        else:
            h, w = x_or_size
        return int(h) // self.patch_size[0], int(w) // self.patch_size[1]

    def num_tokens(self, x_or_size: Tensor | Sequence[int] | None = None) -> int:
        """Tokens per image entering the blocks: prefix tokens + patch grid cells."""
        gh, gw = self.grid_size(x_or_size)
        return self.num_prefix_tokens + gh * gw

    def provides(self, cap: Capability | str) -> bool:
        """Whether this model has capability ``cap`` (see :mod:`vitlens.models.capabilities`)."""
        cap = Capability(cap)
        if cap is Capability.BLOCKS or cap is Capability.TOKEN_SUBSETS or cap is Capability.FEATURE_MAPS:
            return bool(self.blocks)
        if cap is Capability.CLS:
            return self.cls_index is not None
        if cap is Capability.TEXT:
            return bool(self.supports_text)
        if cap is Capability.PATCH_EMBEDDING:
            return type(self).embed_parts is not ViTAdapter.embed_parts
        raise AssertionError(cap)  # every Capability is answered above

    def require(self, what: str, ok: bool, method: str) -> None:
        """Raise a clear :class:`UnsupportedModelError` when a method needs what this model lacks."""
        if not ok:
            raise UnsupportedModelError(f"method '{method}' needs {what}, which {self.describe()} does not have.")

    def require_all(self, needs: Sequence[Capability | str], method: str) -> None:
        """:meth:`require` for each declared capability (the first missing one is named)."""
        for cap in needs:
            self.require(describe_need(Capability(cap)), self.provides(cap), method)

    def select_layers(self, layers: LayersLike, method: str = "", name: str = "layers") -> list[int]:
        """Block indices selected by ``layers`` (:mod:`vitlens.models.layers`: None = all, n = the last n,
        a float f = the last ceil(f * L), a list = those blocks)."""
        return take_indices(layers, self.num_blocks, method=method, name=name)

    def select_layer(self, layers: LayersLike, method: str = "", name: str = "layers") -> int:
        """The one block a single-block method reads: :attr:`default_feature_layer` for ``None``, else the
        single block ``layers`` selects."""
        return take_one(layers, self.num_blocks, self.default_feature_layer, method=method, name=name)

    def describe(self) -> str:
        pre = ", ".join(self.prefix_names) or "no prefix tokens"
        return (f"{self.family} model '{self.name}' ({self.num_blocks} blocks, {self.num_heads} heads, "
                f"patch {self.patch_size[0]}x{self.patch_size[1]}, {pre}, pool={self.pool})")

    # ------------------------------------------------------------------ input
    def set_input_normalisation(self, mean: Sequence[float], std: Sequence[float]) -> None:
        """Declare that the inputs this adapter is given are normalised with ``mean``/``std`` (per channel)
        rather than with the model's own statistics, e.g. the TIS pipeline
        (:func:`vitlens.data.transforms.tis_images`, ImageNet mean/std whatever the model was trained with).

        Everything that maps an input tensor back to pixels reads ``mean``/``std``: the ``paper`` substrates
        of insertion/deletion (pixel black, pixel noise), the perturbation metrics' baseline, the methods'
        pixel-black baselines and the overlays; :meth:`preprocess` then normalises with them too. The
        weights and the forward pass are untouched."""
        self.mean, self.std = tuple(float(v) for v in mean), tuple(float(v) for v in std)

    def check_input(self, x: Tensor) -> Tensor:
        """Validate a (B, 3, H, W) batch for this model and move it to the model's device/dtype."""
        check_images(x, patch_size=self.patch_size,
                     expected_size=None if self.dynamic_size else self.input_size)
        return x.to(device=self.device, dtype=self.dtype)

    def preprocess(self, images) -> Tensor:
        """PIL images, paths or arrays -> (B, 3, H, W) with the model's own eval transform."""
        from .preprocess import preprocess_images

        return preprocess_images(images, size=self.input_size, mean=self.mean, std=self.std,
                                 crop_pct=self.crop_pct, interpolation=self.interpolation).to(self.device)

    # ------------------------------------------------------------------ forward pieces
    def embed(self, x: Tensor) -> Tensor:
        """Tokens entering block 0: (B, P+N, D), prefix tokens first, position embedding added,
        pre-norm applied."""
        raise NotImplementedError

    def embed_parts(self, x: Tensor) -> dict:
        """The pieces of :meth:`embed`, for relevance propagation to the pixels (optional):
        ``conv`` (the patch-embedding ``nn.Conv2d``), ``patches`` (B, N, D) its flattened output,
        ``prefix`` (B, P, D) the prefix tokens before the position embedding, ``pos`` (1, P+N, D) the
        added position embedding, ``post`` the norm applied to the sum (or None), so that
        ``embed(x) == post(cat(prefix, patches) + pos)``."""
        raise UnsupportedModelError(f"{self.describe()} does not expose its patch embedding "
                                    "(needed for relevance at the input pixels).")

    def head(self, tokens: Tensor) -> Tensor:
        """Model output from the tokens after the last block (final norm, pooling, head).

        Works on any number of patch tokens (used for token subsets and, by LeGrad, on every
        layer's tokens)."""
        raise NotImplementedError

    def run_block(self, layer: int, tokens: Tensor, hooks: Mapping[str, Hook] | None = None) -> Tensor:
        """Evaluate block ``layer`` on ``tokens`` with optional hooks (see :mod:`vitlens.models.blocks`)."""
        return run_block(self.blocks[layer], tokens, layer, hooks)

    def run_blocks(self, tokens: Tensor, start: int = 0, end: Optional[int] = None,
                   hooks: Mapping[str, Hook] | None = None) -> Tensor:
        """Evaluate blocks ``start .. end-1`` in order."""
        end = self.num_blocks if end is None else end
        for layer in range(start, end):
            tokens = run_block(self.blocks[layer], tokens, layer, hooks)
        return tokens

    def forward(self, x: Tensor, hooks: Mapping[str, Hook] | None = None) -> Tensor:
        """Full forward pass through the canonical blocks (equal to ``module(x)`` up to float error)."""
        return self.head(self.run_blocks(self.embed(x), hooks=hooks))

    __call__ = forward

    def trace(self, x: Tensor, *, tokens: bool = True, attn: bool = False,
              detach: bool = True) -> Trace:
        """One forward pass recording every block's output tokens and/or attention probabilities."""
        rec_tokens: list[Tensor] = []
        rec_attn: list[Tensor] = []
        hooks: dict[str, Hook] = {}
        if tokens:
            hooks["output"] = lambda l, t: rec_tokens.append(t.detach() if detach else t)
        if attn:
            hooks["attn"] = lambda l, a: rec_attn.append(a.detach() if detach else a)
        emb = self.embed(x)
        out = self.head(self.run_blocks(emb, hooks=hooks))
        return Trace(outputs=out, embedded=emb, tokens=rec_tokens, attn=rec_attn)

    def forward_subset(self, embedded: Tensor, keep: Tensor, image_index: Optional[Tensor] = None) -> Tensor:
        """Run the encoder on prefix tokens + a subset of patch tokens (TIS eq. 3).

        Args:
            embedded: output of :meth:`embed` for the source images, (B, P+N, D).
            keep: (M, K) indices into the N patch tokens (position embedding already added, so
                positions are preserved); every row must have the same length K.
            image_index: (M,) which source image each row takes its tokens from (default: row i
                uses image i when M == B, else image 0 for all rows).
        Returns:
            model outputs for the M token subsets.
        """
        n_patches = embedded.shape[1] - self.num_prefix_tokens
        if (keep < 0).any() or (keep >= n_patches).any():
            raise InputError(f"token indices must lie in [0, {n_patches}).")
        return self.encode_tokens(self.subset_tokens(embedded, keep, image_index))

    def subset_tokens(self, embedded: Tensor, keep: Tensor, image_index: Optional[Tensor] = None) -> Tensor:
        """The (M, P+K, D) token sequences of :meth:`forward_subset` (prefix tokens + kept patch tokens),
        without checking ``keep`` (no device-to-host synchronisation)."""
        P = self.num_prefix_tokens
        B, T, D = embedded.shape
        M, K = keep.shape
        if image_index is None:
            image_index = torch.arange(M, device=embedded.device) if M == B else \
                torch.zeros(M, dtype=torch.long, device=embedded.device)
        patches = embedded[:, P:]
        flat = (image_index[:, None] * patches.shape[1] + keep).reshape(-1)
        kept = patches.reshape(B * patches.shape[1], D).index_select(0, flat).reshape(M, K, D)
        if P:
            kept = torch.cat([embedded[image_index, :P], kept], dim=1)
        return kept

    def encode_tokens(self, tokens: Tensor) -> Tensor:
        """Model outputs for embedded token sequences: all blocks, then :meth:`head` (no hooks)."""
        return self.head(self.run_blocks(tokens))

    # ------------------------------------------------------------------ feature maps (added for ViT-CX)
    #: Hook sites whose value is one vector per token and may serve as a feature map.
    FEATURE_SITES = FEATURE_SITES
    #: Hierarchical models (Swin) set this; methods may pick other defaults for them.
    hierarchical: bool = False

    @property
    def default_feature_layer(self) -> int:
        """The block whose tokens serve as feature maps by default (the last block)."""
        return self.num_blocks - 1

    def feature_maps(self, x: Tensor, layer: Optional[int] = None, site: str = "output") -> tuple[Tensor, Tensor]:
        """One forward pass returning ``(outputs, features)``.

        ``features`` (B, D, gh, gw) are the patch tokens (prefix tokens dropped) of block ``layer``
        (default :attr:`default_feature_layer`; negative counts from the end) at hook ``site`` (one of
        :attr:`FEATURE_SITES`), reshaped to the patch grid; ``outputs`` are the model's outputs.
        """
        if site not in self.FEATURE_SITES:
            raise InputError(f"feature site '{site}' is not one of {', '.join(self.FEATURE_SITES)}.")
        n = self.num_blocks
        layer = self.default_feature_layer if layer is None else int(layer)
        if not -n <= layer < n:
            raise InputError(f"layer {layer} is out of range for {self.describe()} (0..{n - 1} or negative).")
        layer %= n
        got: list[Tensor] = []

        def grab(l: int, t: Tensor) -> None:
            if l == layer:
                got.append(t)

        outputs = self.forward(x, hooks={site: grab})
        gh, gw = self.grid_size(x)
        tok = got[0][:, self.num_prefix_tokens:]
        return outputs, tok.transpose(1, 2).reshape(tok.shape[0], tok.shape[2], gh, gw)
