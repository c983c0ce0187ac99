"""The adapter interface every explanation method talks to.

Methods never touch timm / torchvision / transformers / open_clip internals: they ask a
:class:`ViTAdapter` for the patch grid, the prefix tokens, the embedded tokens, per-block outputs and
attention probabilities (via hooks on the canonical block of :mod:`vitlens.models.blocks`), a run of
the encoder on a subset of patch tokens, and the target score. A new model family is one subclass
that fills in :meth:`embed`, :meth:`head`, :attr:`blocks` and the metadata.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._validate import check_images
from ..errors import InputError, TargetError, UnsupportedModelError
from .blocks import BlockSpec, Hook, run_block
from .targets import SCORE_KINDS, Target, TargetLike, check_target_like


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


class ViTAdapter:
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

    @property
    def num_classes(self) -> Optional[int]:
        return None if self.class_names is None else len(self.class_names)

    def grid_size(self, x_or_size: Tensor | Sequence[int] | None = None) -> tuple[int, int]:
        """Patch grid (gh, gw) for an input batch or an (H, W) size (default: the model's input size)."""
        if x_or_size is None:
            h, w = self.input_size
        elif isinstance(x_or_size, Tensor):
            h, w = x_or_size.shape[-2:]
        else:
            h, w = x_or_size
        return int(h) // self.patch_size[0], int(w) // self.patch_size[1]

    def require(self, what: str, ok: bool, method: str) -> None:
        """Raise a clear :class:`UnsupportedModelError` when a method needs what this model lacks."""
        if not ok:
            raise UnsupportedModelError(f"method '{method}' needs {what}, which {self.describe()} does not have.")

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

    # ------------------------------------------------------------------ compiled forward paths
    #: paths :meth:`compiled_path` can compile: the batched image forward and the token-sequence encoder
    COMPILE_PATHS = ("forward", "encode")
    #: keyword arguments of ``torch.compile`` (static shapes: each batch is padded to one size)
    COMPILE_OPTIONS: dict = {"dynamic": False}

    @property
    def _compile_batch(self) -> dict:
        """Static batch size of each compiled path (set by the first call, see :mod:`vitlens.precision`)."""
        d = self.__dict__.get("_compile_batch_sizes")
        if d is None:
            d = self.__dict__["_compile_batch_sizes"] = {}
        return d

    def compiled_path(self, path: str) -> Optional[Callable[[Tensor], Tensor]]:
        """``torch.compile(dynamic=False)`` of :meth:`forward` (``"forward"``) or :meth:`encode_tokens`
        (``"encode"``), created once per adapter and path; ``None`` (after one warning) when compilation
        is unavailable or has failed for this adapter."""
        if path not in self.COMPILE_PATHS:
            raise InputError(f"unknown compile path '{path}'; choose one of {', '.join(self.COMPILE_PATHS)}.")
        if self.__dict__.get("_compile_failed"):
            return None
        cache = self.__dict__.setdefault("_compiled", {})
        if path not in cache:
            fn = (lambda x: self.forward(x)) if path == "forward" else self.encode_tokens
            try:
                cache[path] = torch.compile(fn, **self.COMPILE_OPTIONS)
            except Exception as e:  # e.g. no compiler backend on this platform
                self.disable_compile(f"{type(e).__name__}: {e}")
                return None
        return cache[path]

    def disable_compile(self, reason: str) -> None:
        """Stop using compiled paths on this adapter (warns once with ``reason``)."""
        import warnings

        if not self.__dict__.get("_compile_failed"):
            warnings.warn(f"torch.compile failed for {self.name} ({reason}); running the eager model instead.",
                          RuntimeWarning, stacklevel=3)
        self.__dict__["_compile_failed"] = True
        self.__dict__.pop("_compiled", None)

    # ------------------------------------------------------------------ targets and scores
    def class_logits(self, outputs: Tensor) -> Tensor:
        """(B, C) class logits from the model outputs (identity for classifiers)."""
        return outputs

    def encode_text(self, prompts: Sequence[str]) -> Tensor:
        """L2-normalised text embeddings (len(prompts), E) for CLIP-style models."""
        raise TargetError(f"{self.describe()} is not a CLIP-style model: text prompts cannot be targets.")

    def _class_index(self, name: str) -> Optional[int]:
        if self.class_names is None:
            return None
        key = name.strip().lower()
        for i, cname in enumerate(self.class_names):
            low = cname.lower()
            if key == low or key in [s.strip() for s in low.split(",")]:
                return i
        return None

    def _class_suggestions(self, name: str) -> str:
        from ..errors import did_you_mean

        if not self.class_names:
            return ""
        short = {}  # every comma-separated synonym ("tench", "Tinca tinca") -> its full class name
        for c in self.class_names:
            for s in c.split(","):
                short.setdefault(s.strip().lower(), s.strip())
        return did_you_mean(name.strip().lower(), short).replace("?", "? (class names: model.class_names)")

    def resolve_target(self, target: TargetLike, x: Optional[Tensor] = None,
                       outputs: Optional[Tensor] = None, batch: Optional[int] = None) -> Target:
        """Turn the user's ``target`` into a :class:`Target` for a batch.

        ``None`` means the predicted class, read from ``outputs`` (computed from ``x`` if not given).
        Ints must lie in ``[0, num_classes)``; strings are class names or, for CLIP-style models,
        text prompts. A single target is broadcast to the whole batch.
        """
        if isinstance(target, Target):
            return target
        target = check_target_like(target)  # one-line errors for floats, bools, float tensors...
        if batch is None:
            batch = outputs.shape[0] if outputs is not None else (x.shape[0] if x is not None else 1)
        dev = self.device
        if target is None:
            if outputs is None:
                if x is None:
                    raise TargetError("target=None needs the images to find the predicted class.")
                with torch.no_grad():
                    outputs = self.forward(x)
            if self.num_classes is None:
                raise TargetError(f"target=None needs a class vocabulary, which {self.describe()} lacks; "
                                  "give a class index or a text prompt as target.")
            idx = self.class_logits(outputs.detach()).argmax(-1).to(dev)
            return Target(idx, [self.class_names[i] for i in idx.tolist()])
        if isinstance(target, Tensor):
            target = target.reshape(-1).tolist()
        items = [target] if isinstance(target, (int, str)) else list(target)
        if len(items) == 1 and batch > 1:
            items = items * batch
        if len(items) != batch:
            raise TargetError(f"got {len(items)} targets for {batch} images; give one target, or one per image.")
        index, labels, prompts, is_text = [], [], [], []
        for it in items:
            if isinstance(it, bool) or not isinstance(it, (int, str)) and not hasattr(it, "__index__"):
                raise TargetError(f"target {it!r} is neither a class index, a class name nor a prompt.")
            if isinstance(it, str):
                ci = self._class_index(it)
                if ci is not None:
                    index.append(ci); labels.append(self.class_names[ci]); is_text.append(False); prompts.append(None)
                elif self.supports_text:
                    index.append(-1); labels.append(it); is_text.append(True); prompts.append(it)
                else:
                    raise TargetError(f"'{it}' is not a class name of {self.describe()}"
                                      " (and it is not a CLIP-style model, so text prompts are not accepted)."
                                      + self._class_suggestions(it))
            else:
                i = int(it)
                n = self.num_classes
                if n is None:
                    raise TargetError(f"class index {i} given but {self.describe()} has no class vocabulary; use a text prompt.")
                if not 0 <= i < n:
                    raise TargetError(f"target class {i} is out of range: the model has {n} classes (0..{n - 1}).")
                index.append(i); labels.append(self.class_names[i]); is_text.append(False); prompts.append(None)
        text = None
        if any(is_text):
            uniq = sorted({p for p in prompts if p is not None})
            emb = self.encode_text(uniq)
            text = torch.zeros(len(items), emb.shape[-1], device=dev, dtype=emb.dtype)
            for j, p in enumerate(prompts):
                if p is not None:
                    text[j] = emb[uniq.index(p)]
        return Target(torch.tensor(index, dtype=torch.long, device=dev), labels, text,
                      torch.tensor(is_text, dtype=torch.bool, device=dev))

    def score(self, outputs: Tensor, target: Target, kind: str = "auto") -> Tensor:
        """The explained quantity for each row of ``outputs`` (B,): see :mod:`vitlens.models.targets`."""
        if kind not in SCORE_KINDS:
            raise InputError(f"unknown score kind '{kind}'; choose one of {', '.join(SCORE_KINDS)}.")
        if len(target) != outputs.shape[0]:
            raise InputError(f"{outputs.shape[0]} outputs but {len(target)} targets.")
        if target.any_text:
            raise TargetError(f"{self.describe()} cannot score text prompts.")
        if kind == "similarity":
            raise TargetError("score='similarity' is only defined for text prompts of CLIP-style models.")
        logits = self.class_logits(outputs)
        idx = target.index.to(logits.device)[:, None]
        if kind == "logit":
            return logits.gather(1, idx)[:, 0]
        return logits.float().softmax(-1).gather(1, idx)[:, 0].to(logits.dtype)

    def default_score(self, target: Target) -> str:
        """The score kind ``"auto"`` resolves to for these targets."""
        return "similarity" if target.any_text else "prob"

    # ------------------------------------------------------------------ feature maps (added for ViT-CX)
    #: Hook sites whose value is one vector per token and may serve as a feature map.
    FEATURE_SITES = ("input", "norm1", "context", "attn_branch", "mid", "norm2", "mlp_branch", "output")
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
