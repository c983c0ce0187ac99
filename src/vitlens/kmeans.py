"""Batched, seeded K-Means in torch (used by TIS, eq. 1).

Runs on the tensors' device, one independent clustering per batch element. Lloyd iterations with
Euclidean distance, as the TIS reference code (``fast_pytorch_kmeans``): initial centroids are
``k`` distinct data points drawn at random (``init="random"``, the reference) or chosen by k-means++
(``init="k-means++"``); at most ``max_iter`` iterations; an image stops when the summed squared
shift of its centroids is at most ``tol``. Ties in the assignment go to the lowest centroid index. Each point set of a batch is initialised from
its own generator seeded with ``seed``, so a result does not depend on the batch it was computed in.
Empty clusters keep their previous centroid (the reference resets them to the zero vector;
``empty="zero"`` reproduces that).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .batching import generator as make_generator
from .errors import InputError


def _sq_dists(points: Tensor, centroids: Tensor) -> Tensor:
    """(B, n, k) squared Euclidean distances up to the per-point constant ||x||^2."""
    return (centroids * centroids).sum(-1)[:, None, :] - 2 * torch.bmm(points, centroids.transpose(1, 2))


def assign(points: Tensor, centroids: Tensor) -> Tensor:
    """Index of the nearest centroid for each point: (B, n)."""
    return _sq_dists(points, centroids).argmin(-1)


def _init_random(points: Tensor, k: int, seed: Optional[int]) -> Tensor:
    B, n, _ = points.shape
    # one generator per point set, seeded identically: an image gets the same initialisation
    # whatever batch it is explained in
    idx = torch.stack([torch.randperm(n, generator=make_generator(seed))[:k] for _ in range(B)]).to(points.device)
    return torch.gather(points, 1, idx[..., None].expand(-1, -1, points.shape[-1])).clone()


def _init_plusplus(points: Tensor, k: int, seed: Optional[int]) -> Tensor:
    B, n, d = points.shape
    if B > 1:
        return torch.cat([_init_plusplus(points[b:b + 1], k, seed) for b in range(B)])
    g = make_generator(seed)
    first = torch.randint(n, (B,), generator=g, device=g.device).to(points.device)
    cents = [points[torch.arange(B, device=points.device), first]]
    best = ((points - cents[0][:, None]) ** 2).sum(-1)
    for _ in range(1, k):
        probs = best / best.sum(-1, keepdim=True).clamp_min(1e-30)
        probs = torch.where(best.sum(-1, keepdim=True) > 0, probs, torch.full_like(probs, 1.0 / n))
        nxt = torch.multinomial(probs.to(g.device), 1, generator=g)[:, 0].to(points.device)
        c = points[torch.arange(B, device=points.device), nxt]
        cents.append(c)
        best = torch.minimum(best, ((points - c[:, None]) ** 2).sum(-1))
    return torch.stack(cents, 1)


def kmeans(points: Tensor, k: int, *, max_iter: int = 100, tol: float = 1e-4, init: str = "random",
           seed: Optional[int] = 0, empty: str = "keep", centroids: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Cluster each of B point sets.

    Args:
        points: (B, n, d) (or (n, d)) points.
        k: number of clusters (1 <= k <= n).
        centroids: optional (B, k, d) initial centroids (overrides ``init``).
    Returns:
        centroids (B, k, d) and labels (B, n).
    """
    squeeze = points.dim() == 2
    if squeeze:
        points = points[None]
        if centroids is not None and centroids.dim() == 2:
            centroids = centroids[None]
    B, n, d = points.shape
    if not 1 <= k <= n:
        raise InputError(f"k-means needs 1 <= k <= number of points ({n}); got k={k}.")
    if init not in ("random", "k-means++"):
        raise InputError(f"unknown k-means init '{init}' (use 'random' or 'k-means++').")
    if empty not in ("keep", "zero"):
        raise InputError(f"unknown empty-cluster rule '{empty}' (use 'keep' or 'zero').")
    points = points.float()
    if centroids is None:
        centroids = _init_random(points, k, seed) if init == "random" else _init_plusplus(points, k, seed)
    else:
        centroids = centroids.float().clone()
    active = torch.ones(B, dtype=torch.bool, device=points.device)
    labels = assign(points, centroids)
    for _ in range(max_iter):
        sums = torch.zeros(B, k, d, device=points.device, dtype=points.dtype)
        sums.scatter_add_(1, labels[..., None].expand(-1, -1, d), points)
        counts = torch.zeros(B, k, device=points.device, dtype=points.dtype)
        counts.scatter_add_(1, labels, torch.ones_like(labels, dtype=points.dtype))
        fill = centroids if empty == "keep" else torch.zeros_like(centroids)
        new = torch.where(counts[..., None] > 0, sums / counts.clamp_min(1)[..., None], fill)
        shift = ((new - centroids) ** 2).sum((1, 2))
        centroids = torch.where(active[:, None, None], new, centroids)
        active = active & (shift > tol)
        labels = assign(points, centroids)
        if not active.any():
            break
    if squeeze:
        return centroids[0], labels[0]
    return centroids, labels
