"""What is being explained: class indices or text prompts, and the score read from the model.

A user gives ``target`` as ``None`` (the predicted class), an int, a list of ints (one per image),
a class name, or, for CLIP-style models, a text prompt (or a list of them). The adapter resolves it
once per call into a :class:`Target`, which methods then repeat to match their batches of masked
inputs and hand back to :meth:`ViTAdapter.score`.

Score kinds (``score=`` in the methods):

* ``"prob"``  softmax probability of the class (the default of TIS, ViT-CX and the metrics);
* ``"logit"`` the pre-softmax class logit (for CLIP: ``logit_scale * cosine``);
* ``"similarity"`` cosine similarity between the image embedding and the prompt's text embedding
  (CLIP-style models only);
* ``"auto"``: what the method (or metric) declares at registration, an :class:`AutoScore`: one kind for
  class targets and one for free-text prompts. Three rules exist: :data:`PROB_OR_SIMILARITY` (the
  perturbation methods and the metrics: a softmax over a single prompt is meaningless, so prompts use
  the similarity), :data:`LOGIT` (the gradient methods of the attention family: the papers differentiate
  the pre-softmax score, ``logit_scale * cosine`` for prompts) and :data:`LOGIT_OR_SIMILARITY` (LeGrad:
  the paper's logit for classes, the released code's cosine similarity for prompts).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Sequence, Union

import torch
from torch import Tensor

TargetLike = Union[None, int, str, Sequence[Union[int, str]], Tensor]
SCORE_KINDS = ("auto", "prob", "logit", "similarity")
#: the ``score=`` parameter type of methods and metrics (the parameter converter reads the choices)
ScoreKind = Literal["auto", "prob", "logit", "similarity"]


@dataclass(frozen=True)
class AutoScore:
    """What ``score="auto"`` resolves to: ``classes`` for class targets, ``prompts`` for free-text prompts."""

    classes: str
    prompts: str

    def resolve(self, score: str, target: Optional["Target"] = None) -> str:
        """``score`` itself unless it is ``"auto"``; then the kind for ``target`` (prompts if any row is one).

        Example::

            >>> LOGIT_OR_SIMILARITY.resolve("auto", target)   # "similarity" for a prompt, "logit" for a class
        """
        if score != "auto":
            return score
        return self.prompts if target is not None and target.any_text else self.classes


#: perturbation methods and the metrics: softmax probability, cosine similarity for prompts
PROB_OR_SIMILARITY = AutoScore("prob", "similarity")
#: gradient methods of the attention family: the pre-softmax score (``logit_scale * cosine`` for prompts)
LOGIT = AutoScore("logit", "logit")
#: LeGrad: the logit for classes (paper), the cosine similarity for prompts (released code)
LOGIT_OR_SIMILARITY = AutoScore("logit", "similarity")


@dataclass
class Target:
    """Resolved targets of a batch.

    ``index`` holds class indices (-1 where the target is a free-text prompt), ``text`` the
    L2-normalised text embeddings (B, E) of prompt targets (``None`` for pure class targets),
    ``labels`` a human-readable label per image.
    """

    index: Tensor
    labels: list[str]
    text: Optional[Tensor] = None
    is_text: Tensor = field(default=None)  # (B,) bool

    def __post_init__(self) -> None:
        if self.is_text is None:
            self.is_text = torch.zeros(len(self.index), dtype=torch.bool, device=self.index.device)

    def __len__(self) -> int:
        return int(self.index.shape[0])

    @property
    def any_text(self) -> bool:
        if self.text is None:  # no prompt embeddings, so no prompt targets (and no device sync)
            return False
        return bool(self.is_text.any())

    def repeat_interleave(self, n: int) -> "Target":
        """Each target repeated ``n`` times in a row (for ``n`` perturbed copies of each image)."""
        return Target(
            index=self.index.repeat_interleave(n),
            labels=[lab for lab in self.labels for _ in range(n)],
            text=None if self.text is None else self.text.repeat_interleave(n, dim=0),
            is_text=self.is_text.repeat_interleave(n),
        )

    def select(self, idx: Union[Tensor, Sequence[int], slice]) -> "Target":
        """The targets at batch positions ``idx`` (a slice stays on the device: no host-device copy)."""
        if isinstance(idx, slice):
            return Target(index=self.index[idx], labels=self.labels[idx],
                          text=None if self.text is None else self.text[idx], is_text=self.is_text[idx])
        if isinstance(idx, slice):
            pos = list(range(len(self)))[idx]
        elif isinstance(idx, Tensor):
            pos = idx.tolist()
        else:
            pos = list(idx)
        t = torch.as_tensor(pos, dtype=torch.long, device=self.index.device)
        return Target(
            index=self.index[t],
            labels=[self.labels[i] for i in pos],
            text=None if self.text is None else self.text[t.to(self.text.device)],
            is_text=self.is_text[t],
        )

    @staticmethod
    def cat(parts: Sequence["Target"]) -> "Target":
        """The targets of several batches, in order (one part is returned as it is)."""
        parts = list(parts)
        if len(parts) == 1:
            return parts[0]
        texts = [p.text for p in parts]
        if any(t is None for t in texts) and not all(t is None for t in texts):  # pad class-only parts
            dim, ref = next((t.shape[-1], t) for t in texts if t is not None)
            texts = [t if t is not None else ref.new_zeros(len(p), dim) for t, p in zip(texts, parts)]
        text = None if all(t is None for t in texts) else torch.cat(texts, 0)
        return Target(torch.cat([p.index for p in parts]), [lab for p in parts for lab in p.labels], text,
                      torch.cat([p.is_text for p in parts]))

    def to(self, device: Union[str, torch.device]) -> "Target":
        return Target(self.index.to(device), list(self.labels),
                      None if self.text is None else self.text.to(device), self.is_text.to(device))


def check_target_like(target) -> TargetLike:
    """Reject targets that are neither ``None``, a class index, a class name / prompt nor a sequence of
    those with a one-line :class:`~vitlens.errors.TargetError` (e.g. ``target=3.5``); return ``target``
    with tensors and arrays of integers turned into lists."""
    from ..errors import TargetError

    def bad(v) -> TargetError:
        if isinstance(v, float):
            return TargetError(f"target {v!r} is a float: give a class index as an int (e.g. target={int(v)}), "
                               "a class name or a text prompt.")
        if isinstance(v, bool):
            return TargetError(f"target {v!r} is a bool: give a class index (int), a class name or a text prompt.")
        return TargetError(f"target {v!r} ({type(v).__name__}) is neither a class index (int), a class name nor "
                           "a text prompt.")

    def ok_item(v) -> bool:
        return (isinstance(v, (int, str)) or hasattr(v, "__index__")) and not isinstance(v, bool)

    if target is None or isinstance(target, Target):
        return target
    if isinstance(target, Tensor) or type(target).__module__ == "numpy":
        t = torch.as_tensor(target)
        if t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
            raise TargetError(f"target tensor/array has dtype {t.dtype}: class indices must be integers.")
        return t.reshape(-1).tolist()
    if isinstance(target, (list, tuple)):
        if not target:
            raise TargetError("target is an empty list: give one target, or one per image.")
        for v in target:
            if not ok_item(v):
                raise bad(v)
        return target
    if not ok_item(target):
        raise bad(target)
    return target
