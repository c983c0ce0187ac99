"""Occlusion (Zeiler & Fergus, "Visualizing and Understanding Convolutional Networks", ECCV 2014, Sec. 4.2).

A window of ``window`` = (h, w) pixels slides over the image with ``stride`` (both default to the
model's patch size, so each window hides exactly one ViT token); the window's pixels are replaced by
``baseline``. For window k with indicator W_k:

    drop_k = f(x) - f(x with W_k occluded)
    S(pixel) = sum_k drop_k W_k(pixel) / sum_k W_k(pixel)

i.e. the score drop averaged over the windows covering each pixel (Captum's ``Occlusion`` attribution
with a scalar output, summed over channels, is the same quantity). Window positions are
``0, stride, 2 stride, ...`` while the window fits inside the image; pixels no window covers (possible
only when the stride does not tile the image) get 0.

Protocol choices: the baseline is 0 of the normalised tensor by default (``"zero"``: the mean colour,
the grey square of the paper and Captum's default), ``"black"`` or any constant; f is
``adapter.score`` (softmax probability by default; cosine similarity for CLIP text prompts). The occluded
images' forward passes follow ``explain(..., precision=, compile=)`` (:mod:`vitlens.precision`); the clean
score and the averages are float32.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from ..batching import batch_slices, resolve_batch_size
from ..batching import progress as progress_bar
from ..errors import InputError
from ..models.base import ViTAdapter
from ..models.targets import PROB_OR_SIMILARITY, ScoreKind
from ._perturbation_utils import BaselineLike, baseline_image, clean_pass, pair, row_scores
from .base import MethodKind, MethodResult, register


def window_starts(size: int, window: int, stride: int) -> Tensor:
    """Top-left coordinates of the windows along one axis."""
    if window > size:
        raise InputError(f"occlusion window {window} is larger than the image side {size}.")
    return torch.arange(0, size - window + 1, stride)


@register("occlusion", kind=MethodKind.PERTURBATION, token_level=False, auto_score=PROB_OR_SIMILARITY,
          description="Occlusion: score drop when a sliding window is hidden (Zeiler & Fergus 2014)")
def occlusion(adapter: ViTAdapter, x: Tensor, target=None, *, seed: Optional[int] = 0,
              batch_size: Optional[int] = None, progress: Optional[bool] = None,
              window: Union[int, tuple[int, int], None] = None, stride: Union[int, tuple[int, int], None] = None,
              baseline: BaselineLike = "zero", score: ScoreKind = "auto") -> MethodResult:
    """Occlusion saliency (pixel maps).

    Args:
        window: occluding window (h, w) or an int; default the patch size.
        stride: step between windows; default the window size (non-overlapping windows).
        baseline: the occluding value (see :func:`baseline_image`).
        score: ``"prob"`` (default for classes), ``"logit"``, ``"similarity"`` or ``"auto"``.
    Returns:
        ``maps`` (B, H, W): the mean score drop of the windows covering each pixel.

    Example::

        >>> exp = vitlens.explain(model, x, "occlusion", window=32, stride=16)
    """
    B, _, H, W = x.shape
    wh, ww = pair(adapter.patch_size if window is None else window, "occlusion window")
    sh, sw = pair((wh, ww) if stride is None else stride, "occlusion stride")
    ys, xs = window_starts(H, wh, sh).to(x.device), window_starts(W, ww, sw).to(x.device)
    outputs, tgt, kind = clean_pass(adapter, x, target, score)
    with torch.no_grad():
        clean = adapter.score(outputs, tgt, kind).float()
    base = baseline_image(adapter, x, baseline)
    ar_h, ar_w = torch.arange(H, device=x.device), torch.arange(W, device=x.device)
    row_in = (ar_h[None] >= ys[:, None]) & (ar_h[None] < ys[:, None] + wh)  # (ny, H)
    col_in = (ar_w[None] >= xs[:, None]) & (ar_w[None] < xs[:, None] + ww)  # (nx, W)
    ny, nx = len(ys), len(xs)
    n = ny * nx
    count = row_in.float().sum(0)[:, None] * col_in.float().sum(0)[None, :]  # windows covering each pixel
    total = B * n
    bs = resolve_batch_size(batch_size, adapter, adapter.num_tokens(x), total)
    acc = torch.zeros(B, H, W, device=x.device, dtype=torch.float32)
    rows_tgt = tgt.repeat_interleave(n)  # row r explains image r // n; sliced on the device below
    with torch.no_grad(), progress_bar(total, "Occlusion windows", progress, unit="img") as bar:
        for sl in batch_slices(total, bs):
            rows = torch.arange(sl.start, sl.stop, device=x.device)
            img, k = rows // n, rows % n
            m = (row_in[k // nx][:, :, None] & col_in[k % nx][:, None, :]).to(x.dtype)  # (b, H, W) 1 = hidden
            inputs = x[img] + m[:, None] * (base - x[img])
            drop = clean[img] - row_scores(adapter, inputs, rows_tgt.select(sl), None, kind)
            acc.index_add_(0, img, drop[:, None, None] * m.float())
            bar.update(sl.stop - sl.start)
    sal = torch.where(count > 0, acc / count.clamp_min(1), torch.zeros_like(acc))
    return MethodResult(target=tgt, maps=sal, outputs=outputs,
                        extras={"n_windows": n, "window": (wh, ww), "stride": (sh, sw), "score": kind})
