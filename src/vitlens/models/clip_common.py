"""What every CLIP-style adapter (open_clip CLIP / SigLIP, Hugging Face ``CLIPModel`` / ``SiglipModel``)
shares: text prompts as targets, an optional zero-shot class vocabulary, and the scores.

Outputs of these adapters are (unnormalised) image embeddings. Scores for a prompt or a vocabulary class
with normalised text embedding t and normalised image embedding i:

* ``"similarity"``: the cosine ``i . t``;
* ``"logit"``: ``logit_scale * i . t (+ logit_bias)`` -- the model's own logit (SigLIP adds its bias);
* ``"prob"``: for a class vocabulary, the softmax over the vocabulary's logits (CLIP zero-shot); for a
  free-text prompt it is refused (a softmax over a single prompt is meaningless).

A subclass provides :meth:`_text_features` (raw text embeddings of a list of prompts) and sets
``self.tokenizer``.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import TargetError, UnsupportedModelError
from .targets import Target


class CLIPTextMixin:
    """Text targets and scores for adapters whose outputs are image embeddings."""

    supports_text = True
    tokenizer = None
    template: str = "a photo of a {}."
    _class_text: Optional[Tensor] = None

    def _init_text(self, tokenizer, class_names: Optional[Sequence[str]], template: str) -> None:
        self.tokenizer = tokenizer
        self.template = template
        self._class_text = None
        if class_names is not None:
            self.set_classes(class_names, template)

    # ---------------------------------------------------------------- vocabulary
    def set_classes(self, class_names: Sequence[str], template: str = "a photo of a {}.") -> None:
        """Use ``class_names`` (prompted with ``template``) as a zero-shot class vocabulary."""
        self.class_names = list(class_names)
        self.template = template
        self._class_text = self.encode_text([template.format(c) for c in self.class_names])

    def _text_features(self, prompts: Sequence[str]) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    @torch.no_grad()
    def encode_text(self, prompts: Sequence[str]) -> Tensor:
        """L2-normalised text embeddings (len(prompts), E), float32."""
        if self.tokenizer is None:
            raise TargetError(f"{self.describe()} has no tokenizer, so text prompts cannot be encoded; "
                              "pass tokenizer= when wrapping the model (e.g. the library's tokenizer for it).")
        return F.normalize(self._text_features(list(prompts)).float(), dim=-1)

    # ---------------------------------------------------------------- scores
    @property
    def logit_scale(self) -> Tensor:
        ls = getattr(self.module, "logit_scale", None)
        return ls.exp().detach() if ls is not None else torch.tensor(100.0)

    @property
    def logit_bias(self) -> Optional[Tensor]:
        """SigLIP's learned bias added to the scaled cosine (``None`` for CLIP)."""
        lb = getattr(self.module, "logit_bias", None)
        return None if lb is None else lb.detach().reshape(())

    def _logits_from_cos(self, cos: Tensor) -> Tensor:
        out = self.logit_scale.to(cos.device, cos.dtype) * cos
        bias = self.logit_bias
        return out if bias is None else out + bias.to(cos.device, cos.dtype)

    def class_logits(self, outputs: Tensor) -> Tensor:
        if self._class_text is None:
            raise TargetError("this CLIP model has no class vocabulary: call set_classes(names) or use text prompts.")
        img = F.normalize(outputs.float(), dim=-1)
        return self._logits_from_cos(img @ self._class_text.to(img.device).T)

    def score(self, outputs: Tensor, target: Target, kind: str = "auto") -> Tensor:
        if not target.any_text:
            if kind == "similarity":
                img = F.normalize(outputs.float(), dim=-1)
                txt = self._class_text.to(img.device)[target.index.to(img.device)]
                return (img * txt).sum(-1)
            return super().score(outputs, target, kind)  # type: ignore[misc]
        if not bool(target.is_text.all()):
            raise TargetError("mixing class indices and text prompts in one batch is not supported.")
        if kind == "prob":
            raise TargetError("score='prob' is undefined for a free-text prompt (a softmax over one prompt); "
                              "use 'similarity' or 'logit', or set a class vocabulary.")
        img = F.normalize(outputs.float(), dim=-1)
        sim = (img * target.text.to(img.device, img.dtype)).sum(-1)
        return self._logits_from_cos(sim) if kind == "logit" else sim


def open_clip_visual(module):
    """The image tower of an open_clip ``CLIP`` / ``CustomTextCLIP`` (clear error for anything else)."""
    v = getattr(module, "visual", None)
    if v is None or not hasattr(module, "encode_text"):
        raise UnsupportedModelError(f"{type(module).__name__} is not an open_clip CLIP model (needs .visual and "
                                    ".encode_text).")
    return v


def open_clip_tokenizer(module, tokenizer):
    """The tokenizer to use: the given one; ``None``: open_clip's CLIP BPE where the text tower has its
    49408-token vocabulary (else none); ``False``: none (text prompts then raise a clear error)."""
    if tokenizer is None:
        import open_clip

        text = getattr(module, "text", None)
        vocab = getattr(text, "vocab_size", None) or getattr(module, "vocab_size", None)
        tokenizer = open_clip.tokenize if vocab in (None, 49408) else False
    return None if tokenizer is False else tokenizer
