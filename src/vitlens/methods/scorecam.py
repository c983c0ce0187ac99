"""Score-CAM (Wang et al., "Score-CAM: Score-Weighted Visual Explanations for CNNs", CVPR-W 2020)
adapted to ViTs as in the ViT-CX paper's baseline (Xie et al., IJCAI 2023): the D channels of the
patch tokens at one block are the activation maps A^k (gh x gw each).

For each channel k (paper eqs. 3-5, 7):

    H^k   = s(Up(A^k))                       bilinear upsampling to H x W, then min-max to [0, 1]
    C(A^k) = f(X . H^k) - f(X_b)             score increase over the baseline image X_b
    L     = ReLU(sum_k alpha_k A^k),  alpha_k = C(A^k)

``X . H^k`` is taken towards ``baseline`` (``X_b + H^k (X - X_b)``); the default ``"zero"`` is the
plain product with the normalised tensor, as in the authors' code, and then ``X_b`` is the all-zero
(mean colour) image. A constant channel gives an all-zero mask. ``weights="softmax"`` uses
``alpha = softmax_k(f(X . H^k))`` (the softmax over channels of the Score-CAM paper's Algorithm 1 and
of pytorch-grad-cam; it is invariant to the baseline subtraction).

Layer: by default the output of the last block's first LayerNorm (``layer=-1, site="norm1"``,
the ``blocks[-1].norm1`` target layer of the ViT-CX code and of pytorch-grad-cam for ViTs); any block
and canonical hook site can be chosen. The map is token-level (gh, gw); :func:`vitlens.explain`
upsamples it. f is ``adapter.score`` (probability by default; cosine similarity for CLIP prompts).
The masked images' forward passes follow ``explain(..., precision=, compile=)`` (:mod:`vitlens.precision`);
the features come from the clean pass at the model's dtype and the weights are float32.
"""
from __future__ import annotations

from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..batching import batch_slices, resolve_batch_size
from ..batching import progress as progress_bar
from ..models.base import ViTAdapter
from ..models.blocks import FeatureSite
from ..models.capabilities import Capability
from ..models.layers import LayersLike
from ..models.targets import PROB_OR_SIMILARITY, ScoreKind
from ._perturbation_utils import BaselineLike, baseline_image, clean_pass, row_scores
from .base import MethodKind, MethodResult, register


def channel_masks(acts: Tensor, size: tuple[int, int]) -> Tensor:
    """(n, gh, gw) activation maps -> (n, H, W) masks: bilinear upsampling, then per-map min-max
    to [0, 1] (a constant map gives zeros)."""
    up = F.interpolate(acts[:, None].float(), size=tuple(size), mode="bilinear", align_corners=False)[:, 0]
    flat = up.reshape(up.shape[0], -1)
    lo = flat.min(1, keepdim=True).values
    span = flat.max(1, keepdim=True).values - lo
    out = torch.where(span > 0, (flat - lo) / span.clamp_min(torch.finfo(flat.dtype).tiny), torch.zeros_like(flat))
    return out.reshape(up.shape)


@register("scorecam", kind=MethodKind.PERTURBATION, token_level=True, needs=(Capability.BLOCKS,),
          auto_score=PROB_OR_SIMILARITY, renamed={"layer": "layers"},
          description="Score-CAM for ViTs: token channels as masks, weighted by the masked image's score (Wang et al. 2020)")
def scorecam(adapter: ViTAdapter, x: Tensor, target=None, *, seed: Optional[int] = 0,
             batch_size: Optional[int] = None, progress: Optional[bool] = None, layers: LayersLike = None,
             site: FeatureSite = "norm1", weights: Literal["cic", "softmax"] = "cic", baseline: BaselineLike = "zero",
             score: ScoreKind = "auto") -> MethodResult:
    """Score-CAM map.

    Args:
        layers: the one block whose patch tokens give the channels (:mod:`vitlens.models.layers`;
            ``None``: the last block).
        site: hook site inside the block: ``"norm1"`` (default), or another token site
            (:data:`vitlens.models.blocks.FeatureSite`: ``"input"``, ``"mid"``, ``"norm2"``, ``"output"``, ...).
        weights: ``"cic"`` alpha_k = f(X . H^k) - f(X_b) (paper eq. 4-5, default) or ``"softmax"``.
        baseline: the image masked pixels move to (see :func:`baseline_image`).
        score: ``"prob"`` (paper), ``"logit"``, ``"similarity"`` (CLIP prompts) or ``"auto"``.

    Returns:
        :class:`MethodResult` with ``token_maps`` (B, gh, gw); ``extras``: ``channel_weights`` (B, D),
        ``score``, ``layer``, ``site``.

    Example::

        >>> exp = vitlens.explain(model, x, "scorecam", layers=[-2], site="output")
    """
    layer = adapter.select_layer(layers, "scorecam")
    captured: list[Tensor] = []

    def grab(l: int, t: Tensor) -> None:
        if l == layer:
            captured.append(t.detach())

    outputs, tgt, kind = clean_pass(adapter, x, target, score, hooks={site: grab})
    P = adapter.num_prefix_tokens
    B, _, H, W = x.shape
    gh, gw = adapter.grid_size(x)
    acts = captured[0][:, P:].float()  # (B, N, D)
    D = acts.shape[-1]
    maps = acts.transpose(1, 2).reshape(B, D, gh, gw)
    base = baseline_image(adapter, x, baseline)
    total = B * D
    bs = resolve_batch_size(batch_size, adapter, adapter.num_tokens(x), total)
    masked_scores = torch.empty(total, device=x.device, dtype=torch.float32)
    with torch.no_grad():
        base_scores = row_scores(adapter, base.expand(B, -1, H, W), tgt, torch.arange(B, device=x.device), kind)
        rows_tgt = tgt.repeat_interleave(D)  # row r explains image r // D; sliced on the device below
        with progress_bar(total, "Score-CAM channels", progress, unit="img") as bar:
            for sl in batch_slices(total, bs):
                rows = torch.arange(sl.start, sl.stop, device=x.device)
                img, ch = rows // D, rows % D
                m = channel_masks(maps[img, ch], (H, W)).to(x.dtype)
                inputs = base + m[:, None] * (x[img] - base)
                masked_scores[sl] = row_scores(adapter, inputs, rows_tgt.select(sl), None, kind)
                bar.update(sl.stop - sl.start)
    s = masked_scores.reshape(B, D)
    alpha = s - base_scores[:, None] if weights == "cic" else s.softmax(-1)
    cam = torch.relu(torch.einsum("bd,bdhw->bhw", alpha, maps))
    return MethodResult(target=tgt, token_maps=cam, outputs=outputs,
                        extras={"channel_weights": alpha.cpu(), "score": kind, "layer": layer, "site": site})
