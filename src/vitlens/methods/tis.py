"""TIS, Transformer Input Sampling (Englebert, Stassin, Nanfack, Mahmoudi, Siebert, Cornu & De
Vleeschouwer, "Explaining through Transformer Input Sampling", ICCV Workshops 2023).

For each image:

* one forward pass records every block's output tokens; prefix tokens are dropped and the blocks are
  concatenated along the channels into A (N_t x L*D);
* eq. (1): K-Means over the L*D columns of A (each a point in R^N_t) with N_m clusters gives the
  centroids K (N_t x N_m);
* eq. (2): binary mask M_j keeps the N_k = round(ratio * N_t) largest entries of centroid j
  (ties: lower token index first);
* eq. (3)-(4): the encoder runs on [prefix tokens + kept tokens] (position embedding already added)
  and w_j is the target's softmax probability (``score="prob"``, the paper) or logit;
* eq. (5): saliency = sum_j w_j M_j / sum_j M_j, tokens covered by no mask get 0.

All masks of all images run as batched gathers of the embedded tokens; no mask is applied in pixel space.
The subset forward passes follow ``explain(..., precision=, compile=)`` (:mod:`vitlens.precision`);
the clean pass that feeds K-Means, the K-Means itself, the scores and eq. (5) stay float32.
"""
from __future__ import annotations

import warnings
from typing import Literal, Optional

import torch
from torch import Tensor

from ..batching import batch_slices, resolve_batch_size
from ..batching import progress as progress_bar
from ..errors import InputError
from ..kmeans import kmeans
from ..models.base import ViTAdapter
from ..models.capabilities import Capability
from ..models.targets import PROB_OR_SIMILARITY, ScoreKind
from ..precision import perturbed_subset
from .base import MethodKind, MethodResult, register


def tis_masks(activations: Tensor, n_masks: int, ratio: float, *, seed: Optional[int] = 0,
              kmeans_init: str = "random", max_iter: int = 100, tol: float = 1e-4,
              empty: str = "keep") -> tuple[Tensor, Tensor]:
    """Eq. (1)-(2): K-Means centroids over activation columns, then top-N_k binary masks.

    Args:
        activations: (B, N_t, L*D) concatenated patch-token activations.
    Returns:
        ``keep`` (B, N_m, N_k) kept token indices and ``centroids`` (B, N_t, N_m).
    """
    B, n_tokens, n_points = activations.shape
    if n_masks > n_points:
        warnings.warn(f"TIS: n_masks={n_masks} exceeds the {n_points} activation columns to cluster; "
                      f"using {n_points} masks.", stacklevel=3)
        n_masks = n_points
    n_keep = int(round(ratio * n_tokens))
    if not 1 <= n_keep <= n_tokens:
        raise InputError(f"TIS ratio={ratio} keeps {n_keep} of {n_tokens} tokens; it must keep between 1 and all.")
    cents, _ = kmeans(activations.transpose(1, 2), n_masks, max_iter=max_iter, tol=tol, init=kmeans_init,
                      seed=seed, empty=empty)  # (B, N_m, N_t)
    order = torch.sort(cents, dim=-1, descending=True, stable=True).indices
    keep = order[..., :n_keep].sort(dim=-1).values
    return keep, cents.transpose(1, 2)


def coverage_weighted_sum(keep: Tensor, weights: Tensor, n_tokens: int) -> Tensor:
    """Eq. (5): sum_j w_j M_j / sum_j M_j for binary masks given by kept indices; 0 where uncovered.

    ``keep`` (B, N_m, N_k) indices, ``weights`` (B, N_m) -> (B, N_t)."""
    B, M, K = keep.shape
    flat = keep.reshape(B, M * K)
    num = torch.zeros(B, n_tokens, dtype=weights.dtype, device=weights.device)
    num.scatter_add_(1, flat, weights[:, :, None].expand(B, M, K).reshape(B, M * K))
    cov = torch.zeros(B, n_tokens, dtype=weights.dtype, device=weights.device)
    cov.scatter_add_(1, flat, torch.ones_like(flat, dtype=weights.dtype))
    return torch.where(cov > 0, num / cov.clamp_min(1), torch.zeros_like(num))


@register("tis", kind=MethodKind.PERTURBATION, token_level=True, needs=(Capability.TOKEN_SUBSETS,),
          auto_score=PROB_OR_SIMILARITY,
          description="Transformer Input Sampling: K-Means token masks scored on token subsets (Englebert et al. 2023)")
def tis(adapter: ViTAdapter, x: Tensor, target=None, *, seed: Optional[int] = 0, batch_size: Optional[int] = None,
        progress: Optional[bool] = None, n_masks: int = 1024, ratio: float = 0.5, score: ScoreKind = "auto",
        kmeans_init: Literal["random", "k-means++"] = "random", max_iter: int = 100, tol: float = 1e-4,
        empty_clusters: Literal["keep", "zero"] = "keep",
        return_masks: bool = False, normalise_output: bool = False) -> MethodResult:
    """TIS saliency.

    Args:
        n_masks: N_m, the number of K-Means clusters = masks (paper default 1024; clamped with a
            warning when there are fewer activation columns).
        ratio: fraction of tokens each mask keeps (N_k = round(ratio * N_t); default 0.5).
        score: ``"prob"`` (paper), ``"logit"``, ``"similarity"`` (CLIP prompts) or ``"auto"``.
        kmeans_init: ``"random"`` (reference code) or ``"k-means++"``.
        max_iter, tol: K-Means stopping rule (reference: 100 and 1e-4).
        empty_clusters: ``"keep"`` an empty cluster's previous centroid, or ``"zero"`` (reference code).
        return_masks: put the kept indices and mask scores in ``extras``.
        normalise_output: min-max normalise the token map before returning it (``map - min``, then
            ``/ max``), as the reference code's ``normalise=True`` default does (``tis/tis.py``,
            ``generate_saliency``); changes only the raw map (``explain(normalise=False)``), which the
            TIS protocols of sparseness and max-sensitivity read.

    Returns:
        :class:`MethodResult` with ``token_maps`` (B, gh, gw), eq. (5); ``extras``: ``n_masks``, ``n_keep``,
        ``score`` (and ``keep`` (B, N_m, N_k), ``mask_scores`` (B, N_m) with ``return_masks``).

    Example::

        >>> exp = vitlens.explain(model, x, "tis", n_masks=256, seed=0)
    """
    if n_masks < 1:
        raise InputError(f"TIS n_masks must be >= 1, got {n_masks}.")
    P = adapter.num_prefix_tokens
    with torch.no_grad():
        tr = adapter.trace(x, tokens=True)
        tgt = adapter.resolve_target(target, outputs=tr.outputs, batch=x.shape[0])
        kind = PROB_OR_SIMILARITY.resolve(score, tgt)
        acts = torch.cat([t[:, P:] for t in tr.tokens], dim=-1).float()  # (B, N_t, L*D)
        B, n_tokens, _ = acts.shape
        keep, _ = tis_masks(acts, n_masks, ratio, seed=seed, kmeans_init=kmeans_init, max_iter=max_iter,
                            tol=tol, empty=empty_clusters)
        del acts, tr.tokens
        n_m, n_k = keep.shape[1], keep.shape[2]
        flat_keep = keep.reshape(B * n_m, n_k)
        image_index = torch.arange(B, device=x.device).repeat_interleave(n_m)
        rep = tgt.repeat_interleave(n_m)
        total = B * n_m
        bs = resolve_batch_size(batch_size, adapter, P + n_k, total)
        weights = torch.empty(total, device=x.device, dtype=torch.float32)
        with progress_bar(total, "TIS masks", progress, unit="mask") as bar:
            for sl in batch_slices(total, bs):
                out = perturbed_subset(adapter, tr.embedded, flat_keep[sl], image_index[sl])
                weights[sl] = adapter.score(out, rep.select(sl), kind).float()
                bar.update(sl.stop - sl.start)
        weights = weights.reshape(B, n_m)
        sal = coverage_weighted_sum(keep, weights, n_tokens)
        if normalise_output:
            sal = sal - sal.min(1, keepdim=True).values
            top = sal.max(1, keepdim=True).values
            sal = sal / torch.where(top > 0, top, torch.ones_like(top))  # a constant map stays 0 (no 0/0)
    gh, gw = adapter.grid_size(x)
    extras = {"n_masks": n_m, "n_keep": n_k, "score": kind}
    if return_masks:
        extras.update(keep=keep.cpu(), mask_scores=weights.cpu())
    return MethodResult(target=tgt, token_maps=sal.reshape(B, gh, gw), outputs=tr.outputs, extras=extras)
