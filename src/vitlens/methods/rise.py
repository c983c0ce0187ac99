"""RISE, Randomized Input Sampling for Explanation (Petsiuk, Das & Saenko, BMVC 2018).

Mask generation (paper Sec. 3.2):

1. sample N binary grids of size s x s, each cell 1 with probability p;
2. upsample each grid bilinearly to (s+1) C_H x (s+1) C_W, with the cell size
   C_H x C_W = ceil(H/s) x ceil(W/s);
3. crop an H x W window at a uniformly random offset in [0, C_H) x [0, C_W).

Saliency (eq. 6, Monte-Carlo estimate): ``S_x(lambda) = 1 / (N p) * sum_i f(x . M_i) M_i(lambda)``.

Protocol choices:

* ``x . M_i`` is applied in the model's normalised space towards ``baseline`` (``x_b + M (x - x_b)``);
  the default ``baseline="zero"`` is exactly ``x * M`` on the normalised tensor, as in the authors'
  PyTorch code (masked pixels become the normalisation mean colour); ``"black"`` masks to pixel 0.
* bilinear upsampling is torch's (``align_corners=False``, edges clamped); the authors' code uses
  scikit-image ``resize(order=1, mode="reflect")``, which differs only within half a grid cell of the
  upsampled border, a region the random crop mostly discards.
* the grids and offsets are drawn once per (seed, N, s, p, H, W) from a CPU generator (so CPU and CUDA
  use the same masks) and cached; each batch's masks are materialised on the device from them, so
  N = 4000 masks of 224 x 224 never sit in memory at once.
* f is ``adapter.score``: the target's softmax probability by default (paper), ``"logit"``, or the
  cosine similarity for CLIP text prompts.
* the masked images' forward passes follow ``explain(..., precision=, compile=)`` (:mod:`vitlens.precision`;
  default fp32 on the CPU, bf16 on CUDA); the scores and the sum of eq. 6 are float32.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..batching import batch_slices, generator, resolve_batch_size
from ..batching import progress as progress_bar
from ..errors import InputError
from ..models.base import ViTAdapter
from ..models.targets import PROB_OR_SIMILARITY, ScoreKind
from ._perturbation_utils import BaselineLike, baseline_image, clean_pass, row_scores
from .base import MethodKind, MethodResult, register

_GRID_CACHE: dict[tuple, tuple[Tensor, Tensor]] = {}
_GRID_CACHE_MAX = 8


def rise_grids(n_masks: int, s: int, p: float, size: tuple[int, int], seed: Optional[int] = 0
               ) -> tuple[Tensor, Tensor]:
    """The random part of RISE's masks, drawn once per key and cached.

    Returns ``grids`` (N, s, s) bool (cell kept with probability p) and ``shifts`` (N, 2) long, the
    crop offsets in [0, C_H) x [0, C_W), both on the CPU."""
    if n_masks < 1:
        raise InputError(f"RISE n_masks must be >= 1, got {n_masks}.")
    if s < 1:
        raise InputError(f"RISE grid size s must be >= 1, got {s}.")
    if not 0.0 < p <= 1.0:
        raise InputError(f"RISE keep probability p must lie in (0, 1], got {p}.")
    H, W = int(size[0]), int(size[1])
    key = (0 if seed is None else int(seed), int(n_masks), int(s), float(p), H, W)
    hit = _GRID_CACHE.get(key)
    if hit is not None:
        return hit
    ch, cw = math.ceil(H / s), math.ceil(W / s)
    g = generator(seed, "cpu")
    grids = torch.rand(n_masks, s, s, generator=g) < p
    shifts = torch.stack([torch.randint(0, ch, (n_masks,), generator=g),
                          torch.randint(0, cw, (n_masks,), generator=g)], dim=1)
    if len(_GRID_CACHE) >= _GRID_CACHE_MAX:
        _GRID_CACHE.pop(next(iter(_GRID_CACHE)))
    _GRID_CACHE[key] = (grids, shifts)
    return grids, shifts


def rise_masks_from_grids(grids: Tensor, shifts: Tensor, size: tuple[int, int], *,
                          device=None, dtype: torch.dtype = torch.float32) -> Tensor:
    """Materialise masks (n, H, W) from grids (n, s, s) and crop offsets (n, 2): bilinear upsampling
    to (s+1) cells, then the shifted H x W crop (one batched gather, no loop over masks)."""
    H, W = int(size[0]), int(size[1])
    n, s, _ = grids.shape
    ch, cw = math.ceil(H / s), math.ceil(W / s)
    g = grids.to(device=device, dtype=dtype)[:, None]
    up = F.interpolate(g, size=((s + 1) * ch, (s + 1) * cw), mode="bilinear", align_corners=False)[:, 0]
    shifts = shifts.to(up.device)
    rows = shifts[:, 0, None] + torch.arange(H, device=up.device)  # (n, H)
    cols = shifts[:, 1, None] + torch.arange(W, device=up.device)  # (n, W)
    idx = torch.arange(n, device=up.device)[:, None, None]
    return up[idx, rows[:, :, None], cols[:, None, :]]


def rise_masks(n_masks: int = 4000, s: int = 7, p: float = 0.5, size: tuple[int, int] = (224, 224),
               seed: Optional[int] = 0, device=None) -> Tensor:
    """All N RISE masks (N, H, W) for a seed (for inspection; :func:`rise` materialises them per batch)."""
    grids, shifts = rise_grids(n_masks, s, p, size, seed)
    return rise_masks_from_grids(grids, shifts, size, device=device)


@register("rise", kind=MethodKind.PERTURBATION, token_level=False, auto_score=PROB_OR_SIMILARITY,
          description="RISE: random upsampled binary masks weighted by the masked image's score (Petsiuk et al. 2018)")
def rise(adapter: ViTAdapter, x: Tensor, target=None, *, seed: Optional[int] = 0, batch_size: Optional[int] = None,
         progress: Optional[bool] = None, n_masks: int = 4000, s: int = 7, p: float = 0.5,
         baseline: BaselineLike = "zero", score: ScoreKind = "auto", masks: Optional[Tensor] = None) -> MethodResult:
    """RISE saliency (pixel maps).

    Args:
        n_masks: N, the number of random masks (4000 as in the TIS paper's comparison; the RISE
            paper used 4000-8000).
        s: grid size (7); p: probability of keeping a cell (0.5).
        baseline: what masked pixels become (see :func:`baseline_image`; default ``"zero"`` = ``x * M``
            on the normalised tensor, the authors' code).
        score: ``"prob"`` (paper), ``"logit"``, ``"similarity"`` (CLIP prompts) or ``"auto"``.
        masks: optional fixed (N, H, W) masks in [0, 1] used instead of the random ones (then
            ``n_masks`` and ``s`` are ignored and ``p`` is still the normaliser of eq. 6).
    Returns:
        ``maps`` (B, H, W) = sum_i f(x . M_i) M_i / (N p); ``extras`` holds ``n_masks``, ``score``.

    Example::

        >>> exp = vitlens.explain(model, x, "rise", n_masks=4000, s=8, p=0.1, score="logit")   # as TIS ran it
    """
    B, _, H, W = x.shape
    if masks is not None:
        if not isinstance(masks, Tensor) or masks.dim() != 3 or tuple(masks.shape[-2:]) != (H, W):
            raise InputError(f"RISE masks must be a (N, {H}, {W}) tensor matching the input size, got "
                             f"{tuple(masks.shape) if isinstance(masks, Tensor) else type(masks).__name__}.")
        if not 0.0 < p <= 1.0:
            raise InputError(f"RISE keep probability p must lie in (0, 1], got {p}.")
        fixed = masks.to(device=x.device, dtype=x.dtype)
        n = fixed.shape[0]
        grids = shifts = None
    else:
        grids, shifts = rise_grids(n_masks, s, p, (H, W), seed)
        fixed, n = None, n_masks
    outputs, tgt, kind = clean_pass(adapter, x, target, score)
    base = baseline_image(adapter, x, baseline)
    total = B * n
    bs = resolve_batch_size(batch_size, adapter, adapter.num_tokens(x), total)
    sal = torch.zeros(B, H, W, device=x.device, dtype=torch.float32)
    rows_tgt = tgt.repeat_interleave(n)  # row r explains image r // n; sliced on the device below
    if grids is not None:  # the (small) grids go to the device once, not per batch
        grids, shifts = grids.to(x.device), shifts.to(x.device)
    with torch.no_grad(), progress_bar(total, "RISE masks", progress, unit="img") as bar:
        for sl in batch_slices(total, bs):
            rows = torch.arange(sl.start, sl.stop, device=x.device)
            img, mid = rows // n, rows % n
            if fixed is not None:
                m = fixed[mid]
            else:
                m = rise_masks_from_grids(grids[mid], shifts[mid], (H, W), device=x.device, dtype=x.dtype)
            inputs = base + m[:, None] * (x[img] - base)
            w = row_scores(adapter, inputs, rows_tgt.select(sl), None, kind)
            sal.index_add_(0, img, w[:, None, None] * m.float())
            bar.update(sl.stop - sl.start)
    sal /= n * p
    return MethodResult(target=tgt, maps=sal, outputs=outputs, extras={"n_masks": n, "score": kind})
