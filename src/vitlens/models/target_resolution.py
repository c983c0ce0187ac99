"""Target resolution and scores: a mixin of :class:`vitlens.models.base.ViTAdapter`.

:meth:`TargetResolution.resolve_target` turns the user's ``target`` (``None``, a class index, a class name,
a prompt, one per image) into a :class:`~vitlens.models.targets.Target`; :meth:`TargetResolution.score`
reads the explained quantity (probability, logit or similarity, see :mod:`vitlens.models.targets`) from
the model's outputs.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from ..errors import InputError, TargetError
from .targets import PROB_OR_SIMILARITY, SCORE_KINDS, Target, TargetLike, check_target_like


class TargetResolution:
    """Class vocabulary, prompts and scores of an adapter (needs ``class_names``, ``device``,
    ``supports_text``, ``forward`` and ``describe`` from the adapter)."""

    class_names: Optional[list[str]]
    supports_text: bool

    @property
    def num_classes(self) -> Optional[int]:
        return None if self.class_names is None else len(self.class_names)

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
        kind = PROB_OR_SIMILARITY.resolve(kind, target)
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
        """The score kind ``"auto"`` resolves to for these targets when nothing else is declared
        (:data:`~vitlens.models.targets.PROB_OR_SIMILARITY`: probability, similarity for prompts)."""
        return PROB_OR_SIMILARITY.resolve("auto", target)

