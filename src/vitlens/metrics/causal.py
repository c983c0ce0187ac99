"""Insertion and deletion (Petsiuk, Das & Saenko, "RISE: Randomized Input Sampling for Explanation of
Black-box Models", BMVC 2018, Sec. 4.1), with the protocol of TIS (Englebert et al. 2023, Tables 1-2).

Definition (default protocol ``"paper"``):

* **ranking**: the pixels of the map at input resolution, most salient first. Ties are broken
  deterministically in raster order (lower flat index ``i * W + j`` first; a stable sort), so a
  constant map deletes/inserts rows top to bottom.
* **steps**: ``n_steps`` (224: one 224-pixel image row per step on a 224 x 224 input, as RISE and
  TIS) steps of ``s = ceil(H * W / n_steps)`` pixels; after step ``k`` the ``min(k s, H W)`` top-ranked
  pixels are changed (all three channels).
* **deletion** replaces the changed pixels of the image by the substrate; **insertion** starts from the
  substrate and restores the changed pixels of the image.
* **curve**: the score of the target after ``k = 0 .. n_steps`` steps (``n_steps + 1`` points: the
  untouched image/substrate at x = 0 and the fully changed one at x = 1); ``xs`` = fraction of
  pixels changed.
* **score**: softmax probability of the target class (``score="prob"``; ``"logit"`` for the raw
  logit, ``"auto"`` for CLIP prompts). ``targets=None`` explains the class predicted on the clean image.
* **AUC**: trapezoid rule over ``xs``: sum_k (y_k + y_{k+1}) / 2 * (x_{k+1} - x_k); with equal steps
  this is RISE's ``(sum(y) - y_0/2 - y_n/2) / n``.

Substrates (each image gets its own), all defined in the model's input pixel space [0, 1] and then
normalised with the model's mean/std:

* ``"blur"``: the image convolved per channel with RISE's 11 x 11, sigma 5 kernel (a unit impulse smoothed
  by ``scipy.ndimage.gaussian_filter(sigma=5)``, whose reflect boundary folds the truncated tails back,
  so it sums to 1), zero padded on the normalised tensor as RISE's code does (zero of the normalised
  tensor = the normalisation mean colour at the border);
* ``"black"``: pixel value 0 (not the zero of the normalised tensor);
* ``"mean"``: the image's own per-channel mean colour;
* ``"random"``: uniform noise U[0, 1) per pixel and channel, seeded by ``seed``;
* ``"zero"``: the zero of the *normalised* tensor (RISE code's ``torch.zeros_like``), i.e. the
  normalisation mean colour in pixel space.

Named protocols:

* ``"paper"``: the same ``substrate`` (default ``"blur"``) for insertion and deletion, curve with the
  untouched point (TIS Tables 1-2 with the four substrates ``blur``, ``black``, ``mean``, ``random``);
* ``"rise_code"``: the RISE authors' evaluation code: deletion substrate ``torch.zeros_like`` of the
  normalised input (``"zero"``; the paper calls it black, pass ``substrate="black"`` for true black),
  insertion substrate ``"blur"``, curve including the untouched image;
* ``"tis_code"``: as ``"paper"`` but the curve has no untouched point: ``n_steps`` points after steps
  1..n (xs from 1/n to 1), trapezoid over those points.

``precision`` (``"fp32"`` | ``"bf16"`` | ``"fp16"``, default fp32 on the CPU, bf16 on CUDA) and ``compile``
apply to the curves' forward passes (:mod:`vitlens.precision`); scores, softmax and AUC stay float32.

All ``B x n_points`` perturbed images are built by one vectorised comparison of each pixel's rank with
the step's pixel count and run as batched forward passes (``batch_size`` images at a time).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..batching import batch_slices, generator, progress as progress_bar, resolve_batch_size
from ..errors import InputError
from ..precision import perturbed_forward, runtime
from .base import MetricResult, check_maps, pixel_stats, register_metric, trapezoid

SUBSTRATES = ("blur", "black", "mean", "random", "zero")
PROTOCOLS = {
    "paper": dict(insertion="blur", deletion="blur", start_point=True),
    "rise_code": dict(insertion="blur", deletion="zero", start_point=True),
    "tis_code": dict(insertion="blur", deletion="blur", start_point=False),
}
TIE_BREAK = "raster order: equal saliency -> lower flat pixel index first (stable sort)"


def rise_kernel_1d(size: int = 11, sigma: float = 5.0, truncate: float = 4.0) -> Tensor:
    """1-D factor of RISE's ``gkern``: ``gaussian_filter`` (reflect mode) of a centred unit impulse.

    ``gaussian_filter`` correlates with a sampled Gaussian of radius ``int(truncate * sigma + 0.5)``
    normalised to sum 1; with ``mode="reflect"`` (half-sample symmetric) the taps that fall outside the
    ``size``-long array fold back inside. The 2-D kernel is the outer product of this factor with itself.
    """
    radius = int(truncate * sigma + 0.5)
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    w = torch.exp(-0.5 * (t / sigma) ** 2)
    w = w / w.sum()
    c = size // 2
    out = torch.zeros(size, dtype=torch.float64)
    for i in range(size):  # a constant-size (11-tap) kernel construction, not a loop over data
        j = i + t.long()
        # half-sample symmetric reflection into [0, size)
        period = 2 * size
        j = j % period
        j = torch.where(j >= size, period - 1 - j, j)
        out[i] = w[j == c].sum()
    return out


def blur(x: Tensor, size: int = 11, sigma: float = 5.0) -> Tensor:
    """RISE's blur substrate: per-channel 2-D convolution with :func:`rise_kernel_1d` squared, zero padding."""
    k1 = rise_kernel_1d(size, sigma).to(device=x.device, dtype=x.dtype)
    k = (k1[:, None] * k1[None, :])[None, None].expand(x.shape[1], 1, size, size)
    return F.conv2d(x, k, padding=size // 2, groups=x.shape[1])


def make_substrate(adapter, x: Tensor, kind: str, *, seed: Optional[int] = 0, blur_kernel: int = 11,
                   blur_sigma: float = 5.0) -> Tensor:
    """The substrate images (B, 3, H, W) in normalised space (see the module docstring)."""
    mean, std = pixel_stats(adapter, x)
    if kind == "blur":
        return blur(x, blur_kernel, blur_sigma)
    if kind == "black":
        return ((0.0 - mean) / std).expand_as(x).contiguous()
    if kind == "mean":
        return x.mean(dim=(2, 3), keepdim=True).expand_as(x).contiguous()
    if kind == "random":
        noise = torch.rand(x.shape, generator=generator(seed), dtype=torch.float32).to(device=x.device, dtype=x.dtype)
        return (noise - mean) / std
    if kind == "zero":
        return torch.zeros_like(x)
    raise InputError(f"unknown substrate '{kind}'; choose one of {', '.join(SUBSTRATES)}.")


def saliency_rank(maps: Tensor) -> Tensor:
    """(B, H*W) rank of every pixel (0 = most salient); ties in raster order."""
    flat = maps.reshape(maps.shape[0], -1)
    order = torch.sort(flat, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(flat.shape[1], device=flat.device).expand_as(order))
    return rank


def step_counts(n_pixels: int, n_steps: int, start_point: bool = True) -> Tensor:
    """Number of changed pixels at each curve point: ``min(k * ceil(HW / n), HW)``."""
    if int(n_steps) < 1:
        raise InputError(f"n_steps must be >= 1, got {n_steps}.")
    per = math.ceil(n_pixels / int(n_steps))
    k = torch.arange(0 if start_point else 1, int(n_steps) + 1)
    return (k * per).clamp(max=n_pixels)


def causal_curves(adapter, x: Tensor, maps: Tensor, target, *, mode: str, substrate: Tensor,
                  counts: Tensor, score: str = "prob", batch_size: Optional[int] = None,
                  progress: Optional[bool] = None) -> Tensor:
    """(B, len(counts)) target scores after changing the ``counts[k]`` top-ranked pixels of each image."""
    B, C, H, W = x.shape
    K = counts.numel()
    rank = saliency_rank(maps).to(x.device)
    counts = counts.to(x.device)
    tgt = target.repeat_interleave(K)
    gh, gw = adapter.grid_size(x)
    bs = resolve_batch_size(batch_size, adapter, gh * gw + adapter.num_prefix_tokens, B * K)
    if mode == "deletion":
        first, second = substrate, x  # changed pixels come from the substrate
    else:
        first, second = x, substrate  # changed pixels are restored from the image
    first = first.reshape(B, C, H * W)
    second = second.reshape(B, C, H * W)
    out = torch.empty(B * K, dtype=torch.float32, device=x.device)
    bar = progress_bar(B * K, f"{mode}", progress, unit="img")
    with torch.no_grad():
        for sl in batch_slices(B * K, bs):
            j = torch.arange(sl.start, sl.stop, device=x.device)
            b, k = j // K, j % K
            changed = (rank[b] < counts[k][:, None])[:, None, :]  # (m, 1, HW)
            imgs = torch.where(changed, first[b], second[b]).reshape(-1, C, H, W)
            y = perturbed_forward(adapter, imgs)
            out[sl] = adapter.score(y, tgt.select(sl), score).float()
            bar.update(sl.stop - sl.start)
    bar.close()
    return out.reshape(B, K)


def _run(mode: str, model, x: Tensor, maps, targets, *, protocol: str, substrate: Optional[str], n_steps: int,
         score: str, blur_kernel: int, blur_sigma: float, seed: Optional[int], batch_size, progress,
         precision=None, compile: Optional[bool] = None) -> MetricResult:
    from ..models import wrap_model

    if protocol not in PROTOCOLS:
        raise InputError(f"unknown {mode} protocol '{protocol}'; choose one of {', '.join(PROTOCOLS)}.")
    adapter = wrap_model(model)
    x = adapter.check_input(x)
    maps = check_maps(maps, x)
    proto = PROTOCOLS[protocol]
    sub = substrate if substrate is not None else proto[mode]
    if sub not in SUBSTRATES:
        raise InputError(f"unknown substrate '{sub}'; choose one of {', '.join(SUBSTRATES)}.")
    tgt = adapter.resolve_target(targets, x=x)
    kind = adapter.default_score(tgt) if score == "auto" else score
    H, W = x.shape[-2:]
    counts = step_counts(H * W, n_steps, proto["start_point"])
    with torch.no_grad():
        subst = make_substrate(adapter, x, sub, seed=seed, blur_kernel=blur_kernel, blur_sigma=blur_sigma)
    with runtime(precision, compile):  # the curves' forward passes only (vitlens.precision)
        curves = causal_curves(adapter, x, maps, tgt, mode=mode, substrate=subst, counts=counts, score=kind,
                               batch_size=batch_size, progress=progress).cpu()
    xs = counts.double() / (H * W)
    values = trapezoid(curves.double(), xs).float()
    full = dict(protocol=protocol, substrate=sub, n_steps=int(n_steps), score=kind, blur_kernel=blur_kernel,
                blur_sigma=blur_sigma, seed=seed, start_point=proto["start_point"],
                pixels_per_step=math.ceil(H * W / int(n_steps)), tie_break=TIE_BREAK, auc="trapezoid over xs")
    return MetricResult(values=values, curves=curves, xs=xs.float(), protocol=full)


@register_metric("insertion", higher_is_better=True)
def insertion(model, x: Tensor, maps, targets=None, *, protocol: str = "paper", substrate: Optional[str] = None,
              n_steps: int = 224, score: str = "prob", blur_kernel: int = 11, blur_sigma: float = 5.0,
              seed: Optional[int] = 0, batch_size: Optional[int] = None, progress: Optional[bool] = None,
              precision=None, compile: Optional[bool] = None) -> MetricResult:
    """Insertion AUC (RISE Sec. 4.1): start from the substrate, restore the most salient pixels first.

    Higher is better. ``substrate=None`` takes the protocol's (``"blur"`` for every named protocol);
    see the module docstring for the ranking, steps, curve end points (x = 0 is the pure substrate
    unless ``protocol="tis_code"``), score (softmax probability), tie-breaking (raster order) and the
    trapezoid AUC. Returns ``values`` (B,) AUC, ``curves`` (B, n_points), ``xs`` (n_points,).
    """
    return _run("insertion", model, x, maps, targets, protocol=protocol, substrate=substrate, n_steps=n_steps,
                score=score, blur_kernel=blur_kernel, blur_sigma=blur_sigma, seed=seed, batch_size=batch_size,
                progress=progress, precision=precision, compile=compile)


@register_metric("deletion", higher_is_better=False)
def deletion(model, x: Tensor, maps, targets=None, *, protocol: str = "paper", substrate: Optional[str] = None,
             n_steps: int = 224, score: str = "prob", blur_kernel: int = 11, blur_sigma: float = 5.0,
             seed: Optional[int] = 0, batch_size: Optional[int] = None, progress: Optional[bool] = None,
             precision=None, compile: Optional[bool] = None) -> MetricResult:
    """Deletion AUC (RISE Sec. 4.1): replace the most salient pixels by the substrate first.

    Lower is better. ``substrate=None`` takes the protocol's (``"blur"`` for ``"paper"`` and
    ``"tis_code"``, ``"zero"`` for ``"rise_code"``); see the module docstring for the ranking, steps,
    curve end points (x = 0 is the untouched image unless ``protocol="tis_code"``), score (softmax
    probability), tie-breaking (raster order) and the trapezoid AUC.
    """
    return _run("deletion", model, x, maps, targets, protocol=protocol, substrate=substrate, n_steps=n_steps,
                score=score, blur_kernel=blur_kernel, blur_sigma=blur_sigma, seed=seed, batch_size=batch_size,
                progress=progress, precision=precision, compile=compile)
