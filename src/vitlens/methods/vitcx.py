"""ViT-CX, causal explanation of Vision Transformers (Weiyan Xie, Xiao-Hui Li, Caleb Chen Cao & Nevin L.
Zhang, "ViT-CX: Causal Explanation of Vision Transformers", IJCAI 2023, pp. 1569-1577; arXiv:2211.03064;
code: vaynexie/CausalX-ViT).

For each image (one forward pass gives both the clean output and the features):

1. **ViT masks.** The patch tokens of one block (prefix tokens dropped) form D feature maps on the
   patch grid; each is upsampled bilinearly to the input size (``align_corners=False``) and min-max
   normalised to [0, 1] (a constant map becomes 0).

   *Feature site* (``site=``): the default is the authors' code and every published ViT-CX
   figure: the output of the chosen block's first LayerNorm, i.e. the normalised input to its attention
   (``"norm1"``; ``ViT_CX.py`` is called with ``target_layer=model.blocks[-1].norm1``, and TIS's
   ``comparison_methods/vitcx_wrapper.py`` passes the same layer). The paper's text describes the
   output of the attention module (``"attn_branch"``, kept as an option; for models with layer scale
   this includes the per-channel scale, which does not change a min-max-normalised mask when positive).
   Any site of ``adapter.FEATURE_SITES`` is accepted. *Block* (``layers=``, one block): the last block for
   ViTs, the last block of the second-to-last stage for Swin (the paper's Sec. 4.1;
   ``adapter.default_feature_layer``).

2. **Mask clustering.** Distance 1 - cosine similarity between the pixel-resolution masks
   (similarity 0 when a mask is all zero, as in the authors' code); agglomerative clustering with
   complete linkage; two clusters merge while their distance is below ``delta`` (0.1 for ViT/DeiT,
   0.05 for Swin, the paper's values). A cluster's mask is the mean of its members, min-max
   normalised again. The number of masks K varies per image. Clusters are ordered by their smallest
   member channel (this fixes which noise sample each mask gets).

   *Exact shortcut.* Bilinear upsampling is a linear map U = R_h (x) R_w whose rows sum to 1, so the
   normalised mask is m_i = U g_i with g_i = (f_i - a_i) / (b_i - a_i) on the patch grid (a_i, b_i the
   min / max of U f_i). Hence <m_i, m_j> = tr(g_i^T (R_h^T R_h) g_j (R_w^T R_w)) is computed on the
   grid in float64 (N^2 D + N D^2 instead of HW D^2 operations), and a_i, b_i are read off the few
   output rows/columns where the interpolation weights change segment (a bilinear function on a
   rectangle of samples attains its extremes at the rectangle's corners). A cluster's mean mask is
   U (mean of g). The test compares these clusters with scikit-learn on pixel-resolution masks.

3. **Debiased causal impact score**, eq. (2):
   s_i = f(y | X * M_i + eps_i) - f(y | X + eps_i) + f(y | X), eps_i = (1 - M_i) Z_i,
   Z_i ~ N(0, sigma^2) i.i.d. per pixel and channel, one draw per mask, in the model's normalised
   input space (sigma = 0.1). Z for the K masks of an image is drawn as one
   ``sigma * torch.randn(K, C, H, W)`` from a generator seeded with ``seed`` on the model's device,
   so the result does not depend on the batch size or on the other images of the batch.
   f is the target's softmax probability (``score="prob"``) or, for text prompts of CLIP-style
   models, the image-text cosine similarity (``"auto"`` picks these; this extension is not in the paper).

4. **Pixel-coverage-bias (PCB) correction**, eq. (5): S = sum_i s_i M_i / sum_i M_i, 0 where no
   mask covers a pixel; :func:`vitlens.explain` then min-max normalises S.

Ablation switches (paper Table 2): ``masks="all"`` (no clustering: all D ViT masks),
``masks="random"`` (random masks, see :func:`random_masks`), ``causal_score="plain"``
(s_i = f(y | X * M_i), no noise), ``pcb=False`` (S = sum_i s_i M_i).

All masked and noised inputs run batched on the model's device at the run's precision
(:mod:`vitlens.precision`; the clean pass giving the features and f(y | X) stays at the model's dtype);
no backward pass, no model copies.
Only the D x D distance matrix goes to the CPU for SciPy's hierarchical clustering.
"""
from __future__ import annotations

from typing import Literal, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..batching import batch_slices, generator, resolve_batch_size
from ..batching import progress as progress_bar
from ..errors import InputError
from ..models.base import ViTAdapter
from ..models.blocks import FeatureSite
from ..models.capabilities import Capability
from ..models.layers import LayersLike
from ..models.targets import PROB_OR_SIMILARITY, ScoreKind, Target
from ..precision import perturbed_forward
from .base import MethodKind, MethodResult, register

DELTA_VIT = 0.1
DELTA_SWIN = 0.05
MaskMode = Literal["clustered", "all", "random"]
CausalScore = Literal["debiased", "plain"]


# ---------------------------------------------------------------------- bilinear algebra
def interp_matrix(n_in: int, n_out: int, dtype: torch.dtype = torch.float64,
                  device: Union[str, torch.device] = "cpu") -> Tensor:
    """(n_out, n_in) matrix R of 1-D linear interpolation (``align_corners=False``), so that
    ``F.interpolate(f, size, mode="bilinear")`` equals ``R_h @ f @ R_w.T`` for a 2-D map f."""
    eye = torch.eye(n_in, dtype=dtype, device=device)[:, None]  # (n_in, 1, n_in): unit signals
    return F.interpolate(eye, size=n_out, mode="linear", align_corners=False)[:, 0].T.contiguous()


def _segment_ends(R: Tensor) -> Tensor:
    """Output indices that start or end a run of rows of R with the same support (where the
    interpolation weights vary linearly); the extremes of an upsampled map lie on these rows."""
    support = R != 0
    change = torch.ones(R.shape[0], dtype=torch.bool, device=R.device)
    change[1:] = (support[1:] != support[:-1]).any(1)
    starts = torch.nonzero(change)[:, 0]
    ends = torch.cat([starts[1:] - 1, torch.tensor([R.shape[0] - 1], device=R.device)])
    return torch.unique(torch.cat([starts, ends]))


def normalised_grid_masks(feats: Tensor, size: tuple[int, int]) -> Tensor:
    """g = (f - a) / (b - a) per channel on the grid, where a, b are the min / max of the bilinear
    upsampling of f to ``size`` (0 for a constant channel, i.e. b - a <= 1e-12 max(|a|, |b|)): upsampling g gives the ViT masks exactly.

    ``feats`` (..., D, h, w) -> same shape, float64."""
    f = feats.double()
    h, w = f.shape[-2:]
    Rh, Rw = interp_matrix(h, size[0], device=f.device), interp_matrix(w, size[1], device=f.device)
    Eh, Ew = Rh[_segment_ends(Rh)], Rw[_segment_ends(Rw)]
    ext = Eh @ f @ Ew.T  # the upsampled map on its extreme rows / columns
    lo = ext.amin(dim=(-2, -1), keepdim=True)
    hi = ext.amax(dim=(-2, -1), keepdim=True)
    span = hi - lo
    # constant channel (up to float64 rounding of the interpolation weights) -> all-zero mask
    ok = span > 1e-12 * torch.maximum(hi.abs(), lo.abs()).clamp_min(1e-30)
    return torch.where(ok, (f - lo) / torch.where(ok, span, torch.ones_like(span)), torch.zeros_like(f))


def mask_cosine_distances(grid_masks: Tensor, size: tuple[int, int]) -> Tensor:
    """1 - cosine similarity between the pixel-resolution masks ``upsample(g_i)``, computed on the
    grid: <U g_i, U g_j> = tr(g_i^T A_h g_j A_w), A = R^T R. Similarity 0 for an all-zero mask.

    ``grid_masks`` (D, h, w) float64 -> (D, D) float64."""
    g = grid_masks.double()
    D, h, w = g.shape
    Rh, Rw = interp_matrix(h, size[0], device=g.device), interp_matrix(w, size[1], device=g.device)
    t = torch.matmul(torch.matmul(Rh.T @ Rh, g), Rw.T @ Rw)  # (D, h, w)
    gram = g.reshape(D, -1) @ t.reshape(D, -1).T
    gram = (gram + gram.T) / 2
    norm = gram.diagonal().clamp_min(0).sqrt()
    denom = norm[:, None] * norm[None, :]
    cos = torch.where(denom > 0, gram / torch.where(denom > 0, denom, torch.ones_like(denom)), torch.zeros_like(gram))
    dist = (1 - cos).clamp(0, 2)
    dist.fill_diagonal_(0)
    return dist


def agglomerative_labels(dist: Tensor, delta: float) -> np.ndarray:
    """Complete-linkage agglomerative clustering of a precomputed (D, D) distance matrix; clusters
    merge while their distance is < ``delta`` (scikit-learn's ``distance_threshold`` rule). Labels are
    0..K-1 ordered by each cluster's smallest member."""
    from scipy.cluster.hierarchy import fcluster, linkage
    from scipy.spatial.distance import squareform

    n = dist.shape[0]
    if n == 1 or delta <= 0:
        return np.arange(n)
    cond = squareform(dist.cpu().double().numpy(), checks=False)
    tree = linkage(cond, method="complete")
    raw = fcluster(tree, t=np.nextafter(float(delta), -np.inf), criterion="distance")
    _, first = np.unique(raw, return_index=True)
    order = np.argsort(first)  # clusters by smallest member
    remap = np.empty(len(order), dtype=np.int64)
    remap[order] = np.arange(len(order))
    return remap[np.unique(raw, return_inverse=True)[1]]


def minmax_maps(m: Tensor) -> Tensor:
    """Per-map min-max normalisation over the last two dims (constant -> 0)."""
    lo = m.amin(dim=(-2, -1), keepdim=True)
    span = m.amax(dim=(-2, -1), keepdim=True) - lo
    return torch.where(span > 0, (m - lo) / torch.where(span > 0, span, torch.ones_like(span)), torch.zeros_like(m))


def upsample_maps(grid: Tensor, size: tuple[int, int]) -> Tensor:
    """(K, h, w) -> (K, H, W) bilinear (``align_corners=False``)."""
    return F.interpolate(grid[:, None], size=tuple(size), mode="bilinear", align_corners=False)[:, 0]


def vitcx_masks(feats: Tensor, size: tuple[int, int], delta: Optional[float] = DELTA_VIT,
                device: Optional[torch.device] = None) -> tuple[Tensor, np.ndarray]:
    """Step 1-2 for one image: features (D, h, w) -> masks (K, H, W) in [0, 1] and the cluster label of
    each channel. ``delta=None`` skips clustering (all D ViT masks)."""
    device = feats.device if device is None else device
    g = normalised_grid_masks(feats.detach().to("cpu"), size)  # (D, h, w) float64
    if delta is None:
        labels = np.arange(g.shape[0])
        grid = g
    else:
        labels = agglomerative_labels(mask_cosine_distances(g, size), delta)
        lab = torch.from_numpy(labels)
        K = int(labels.max()) + 1
        grid = torch.zeros(K, *g.shape[1:], dtype=g.dtype).index_add_(0, lab, g)
        grid = grid / torch.bincount(lab, minlength=K).to(g.dtype)[:, None, None]
    masks = upsample_maps(grid.to(device=device, dtype=torch.float32), size)
    return minmax_maps(masks) if delta is not None else masks.clamp(0, 1), labels


def random_masks(n: int, grid: tuple[int, int], size: tuple[int, int], g: torch.Generator,
                 device: torch.device) -> Tensor:
    """The random-mask ablation: ``n`` maps of i.i.d. U(0, 1) values on the feature grid, upsampled
    bilinearly and min-max normalised (the same form as ViT masks, without the model's features)."""
    u = torch.rand(n, *grid, generator=g, device=device)
    return minmax_maps(upsample_maps(u, size))


# ---------------------------------------------------------------------- scores and saliency
def pcb_saliency(masks: Tensor, scores: Tensor, pcb: bool = True) -> Tensor:
    """Eq. (5): sum_i s_i M_i / sum_i M_i (0 where uncovered); without PCB: sum_i s_i M_i.

    ``masks`` (K, H, W), ``scores`` (K,) -> (H, W)."""
    num = torch.einsum("k,khw->hw", scores.to(masks.dtype), masks)
    if not pcb:
        return num
    cov = masks.sum(0)
    return torch.where(cov > 0, num / torch.where(cov > 0, cov, torch.ones_like(cov)), torch.zeros_like(num))


@register("vitcx", kind=MethodKind.PERTURBATION, token_level=False, needs=(Capability.FEATURE_MAPS,),
          auto_score=PROB_OR_SIMILARITY, renamed={"layer": "layers", "feature": "site"},
          description="ViT-CX: clustered ViT-feature masks scored by debiased causal impact (Xie et al. 2023)")
def vitcx(adapter: ViTAdapter, x: Tensor, target=None, *, seed: Optional[int] = 0, batch_size: Optional[int] = None,
          progress: Optional[bool] = None, layers: Union[LayersLike, Sequence[tuple[int, int]]] = None,
          site: FeatureSite = "norm1", delta: Optional[float] = None, masks: MaskMode = "clustered",
          n_random_masks: Optional[int] = None, causal_score: CausalScore = "debiased", pcb: bool = True,
          sigma: float = 0.1, score: ScoreKind = "auto", return_masks: bool = False) -> MethodResult:
    """ViT-CX saliency (pixel maps).

    Args:
        layers: the one block whose tokens give the features (:mod:`vitlens.models.layers`; ``None``:
            the paper's block, the last one; Swin: the last block of the second-to-last stage; Swin also
            takes ``[(stage, block)]``).
        site: hook site of the features: ``"norm1"`` (default; the authors' code: the first
            LayerNorm's output) or ``"attn_branch"`` (the paper's text: output of the attention
            module); see module docs.
        delta: clustering distance threshold (default 0.1, 0.05 for hierarchical/Swin models).
        masks: ``"clustered"`` (paper), ``"all"`` (no-clustering ablation), ``"random"`` (random-mask
            ablation, as many masks as clustering gives unless ``n_random_masks`` is set).
        causal_score: ``"debiased"`` (eq. 2) or ``"plain"`` (f(y | X * M_i)).
        pcb: apply the pixel-coverage-bias correction of eq. (5).
        sigma: standard deviation of the noise Z in the normalised input space (paper: 0.1).
        score: ``"prob"`` (paper), ``"logit"``, ``"similarity"`` (text prompts) or ``"auto"``.
        return_masks: put the masks (list of (K, H, W) CPU tensors), their causal scores and the
            cluster labels in ``extras``.

    Returns:
        :class:`MethodResult` with ``maps`` (B, H, W), eq. (5); ``extras``: ``n_masks`` (K per image),
        ``site``, ``delta``, ``layer``, ``masks``, ``causal_score``, ``pcb``, ``score``.

    Example::

        >>> exp = vitlens.explain(model, x, "vitcx", causal_score="plain", pcb=False)  # Table 2
    """
    if not sigma >= 0:
        raise InputError(f"ViT-CX sigma must be >= 0, got {sigma}.")
    if delta is None:
        delta = DELTA_SWIN if adapter.hierarchical else DELTA_VIT
    if not 0 <= float(delta) <= 2:
        raise InputError(f"ViT-CX delta is a cosine distance threshold in [0, 2], got {delta}.")
    if n_random_masks is not None and n_random_masks < 1:
        raise InputError(f"ViT-CX n_random_masks must be >= 1, got {n_random_masks}.")
    layer = adapter.select_layer(layers, "vitcx")
    B, C, H, W = x.shape
    size = (H, W)
    dev = x.device
    with torch.no_grad():
        outputs, feats = adapter.feature_maps(x, layer, site)
        tgt = adapter.resolve_target(target, outputs=outputs, batch=B)
        kind = PROB_OR_SIMILARITY.resolve(score, tgt)
        clean = adapter.score(outputs, tgt, kind).float()  # f(y | X)

        all_masks: list[Tensor] = []
        all_labels: list[np.ndarray] = []
        for b in range(B):  # clustering is per image (K varies); the heavy part below is batched
            if masks == "random" and n_random_masks is not None:
                m, labels = random_masks(n_random_masks, tuple(feats.shape[-2:]), size, generator(seed, dev), dev), None
            else:
                m, labels = vitcx_masks(feats[b], size, None if masks == "all" else float(delta), device=dev)
                if masks == "random":
                    m = random_masks(m.shape[0], tuple(feats.shape[-2:]), size, generator(seed, dev), dev)
            all_masks.append(m)
            all_labels.append(labels)
        del feats

        counts = [m.shape[0] for m in all_masks]
        per_item = 2 if causal_score == "debiased" else 1
        total = sum(counts)
        n_tokens = adapter.num_tokens(x)
        # batch_size counts forward-pass inputs; each mask needs ``per_item`` of them
        bs = max(1, resolve_batch_size(batch_size, adapter, n_tokens, total * per_item) // per_item)
        img_of = torch.repeat_interleave(torch.arange(B), torch.tensor(counts))
        starts = [sum(counts[:b]) for b in range(B)]
        flat_masks = torch.cat(all_masks)  # (total, H, W)
        scores = torch.empty(total, dtype=torch.float32, device=dev)
        noise: dict[int, Tensor] = {}
        img_of_dev = img_of.to(dev)  # once: no host-device copies inside the mask loop
        rows_tgt = tgt.select(img_of)
        img_of_list = img_of.tolist()  # owner lookups of the noise cache without tensor reads in the loop
        with progress_bar(total, "ViT-CX masks", progress, unit="mask") as bar:
            for sl in batch_slices(total, bs):
                M = flat_masks[sl].to(x.dtype)[:, None]  # (n, 1, H, W)
                owners = img_of_dev[sl]
                imgs = x[owners]
                rep = rows_tgt.select(sl)
                if causal_score == "plain":
                    out = perturbed_forward(adapter, imgs * M)
                    scores[sl] = adapter.score(out, rep, kind).float()
                else:
                    Z = _noise_slice(noise, sl, img_of_list, starts, counts, (C, H, W), sigma, seed, x)
                    eps = (1 - M) * Z
                    out = perturbed_forward(adapter, torch.cat([imgs * M + eps, imgs + eps]))
                    s = adapter.score(out, _twice(rep), kind).float()
                    n = M.shape[0]
                    scores[sl] = s[:n] - s[n:] + clean[owners]
                bar.update(sl.stop - sl.start)

        sal = torch.stack([pcb_saliency(m, s, pcb) for m, s in zip(all_masks, scores.split(counts))])
    extras = {"n_masks": counts, "site": site, "delta": None if masks == "all" else float(delta), "layer": layer,
              "masks": masks, "causal_score": causal_score, "pcb": pcb, "score": kind}
    if return_masks:
        extras.update(mask_tensors=[m.cpu() for m in all_masks], mask_scores=[s.cpu() for s in scores.split(counts)],
                      cluster_labels=all_labels)
    return MethodResult(target=tgt, maps=sal, outputs=outputs, extras=extras)


def _twice(t: Target) -> Target:
    """The targets of a batch twice in a row (masked inputs, then noised inputs)."""
    return Target(index=torch.cat([t.index, t.index]), labels=t.labels + t.labels,
                  text=None if t.text is None else torch.cat([t.text, t.text]),
                  is_text=torch.cat([t.is_text, t.is_text]))


def _noise_slice(cache: dict, sl: slice, img_of: Sequence[int], starts: list[int], counts: list[int],
                 shape: tuple[int, int, int], sigma: float, seed: Optional[int], x: Tensor) -> Tensor:
    """Z for the masks ``sl`` of the flat (image-major) mask list.

    The K masks of image b get ``sigma * randn(K, C, H, W)`` from a generator seeded with ``seed`` on
    the model's device, drawn once per image and kept only while its masks are in flight."""
    first, last = int(img_of[sl.start]), int(img_of[sl.stop - 1])
    parts = []
    for b in range(first, last + 1):  # the (few) images this slice touches
        if b not in cache:
            g = generator(seed, x.device)
            cache[b] = (sigma * torch.randn(counts[b], *shape, generator=g, device=x.device,
                                            dtype=torch.float32)).to(x.dtype)
        lo = max(sl.start, starts[b]) - starts[b]
        hi = min(sl.stop, starts[b] + counts[b]) - starts[b]
        parts.append(cache[b][lo:hi])
    for b in [k for k in cache if k < last]:
        del cache[b]
    return torch.cat(parts)
