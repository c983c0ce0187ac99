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
* ``"auto"`` ``prob`` for classes, ``similarity`` for free-text prompts (a softmax over a single prompt
  is meaningless).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

TargetLike = Union[None, int, str, Sequence[Union[int, str]], Tensor]
SCORE_KINDS = ("auto", "prob", "logit", "similarity")


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
