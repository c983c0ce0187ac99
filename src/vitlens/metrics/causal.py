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
* ``"random"``: uniform noise U[0, 1) per pixel and channel, seeded by ``seed``: one noise image, the same for
  every image of the batch (so a value never depends on which other images share its batch);
* ``"zero"``: the zero of the *normalised* tensor (RISE code's ``torch.zeros_like``), i.e. the
  normalisation mean colour in pixel space.

Named protocols:

* ``"paper"``: the same ``substrate`` (default ``"blur"``) for insertion and deletion, curve with the
  untouched point (TIS Tables 1-2 with the four substrates ``blur``, ``black``, ``mean``, ``random``);
* ``"rise_code"``: the RISE authors' evaluation code: deletion substrate ``torch.zeros_like`` of the
  normalised input (``"zero"``; the paper calls it black, pass ``substrate="black"`` for true black),
  insertion substrate ``"blur"``, curve including the untouched image;
* ``"tis_code"``: the TIS authors' evaluation code (aenglebert/Transformer_Input_Sampling,
  ``metrics/utils.py``, ``metrics/insertion.py``, ``metrics/deletion.py``, ``config/metric/*.yaml``):

  - every substrate is built on the *normalised* input tensor (``metrics/utils.py``): ``"black"`` =
    ``torch.zeros_like`` (the normalisation mean colour, not pixel black), ``"random"`` =
    ``torch.rand_like`` U[0, 1) in normalised units (here one noise image drawn from ``seed`` and used for
    every image, so a value does not depend on the batch; TIS draws from the global generator per
    image), ``"mean"`` = one scalar, the
    image tensor's mean over channels and pixels, ``"blur"`` = torchvision's ``gaussian_blur`` with an
    11 x 11 kernel, sigma 5 (sampled Gaussian on ``linspace(-5, 5, 11)``, normalised to sum 1) and its
    *reflect* padding (:func:`tis_blur`);
  - ranking ``torch.flip(saliency.view(-1, HW).argsort(), dims=[-1])``, run on CUDA (``evaluate.py``),
    where torch sorts a row longer than 4096 elements (HW = 50176) with a stable segmented radix sort
    (the unstable bitonic sort is only used for short rows): equal saliency therefore ends in
    *descending* flat index (the later raster pixel is changed first). Implemented as a stable
    ascending sort, flipped (:func:`saliency_rank` ``ties="reverse_raster"``), on every device (torch's
    CPU ``argsort`` without ``stable=True`` is not stable and would give an arbitrary order);
  - ``n_steps`` = 224, ``ceil(HW / n)`` pixels per step, the curve holds the ``n`` softmax scores of the
    target *after* steps 1..n (no untouched point; xs = k / n);
  - AUC: ``evaluate.py`` writes the ``n`` per-step scores of each image to a CSV row; the repository has
    no AUC code and the paper no formula beyond "area under the curve". The rule implemented is the
    area of the step curve those scores define, the mean ``(1/n) sum_{k=1..n} y_k`` (score y_k held
    over the k-th step of width 1/n; ``auc="mean"``), which is what averaging a CSV row gives. A
    trapezoid over the same n points would differ by ``(y_1 + y_n) / (2n)``. The curves are returned
    (and stored by ``vitlens bench``), so another rule can be recomputed from them;
  - the map ranked is the method's raw output upsampled bilinearly to the input size (TIS's
    ``evaluate.py`` applies torchvision ``Resize`` to the stored raw map): pass ``raw_maps`` (B, h, w)
    (``vitlens bench`` does, from the raw maps it stores); without it ``maps`` is ranked.

``precision`` (``"fp32"`` | ``"bf16"`` | ``"fp16"``, default fp32 on the CPU, bf16 on CUDA) and ``compile``
apply to the curves' forward passes (:mod:`vitlens.precision`); scores, softmax and AUC stay float32.

All ``B x n_points`` perturbed images are built by one vectorised comparison of each pixel's rank with
the step's pixel count and run as batched forward passes (``batch_size`` images at a time).
"""
from __future__ import annotations

import math
from typing import Literal, Optional, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

from ..batching import batch_slices, generator, resolve_batch_size
from ..batching import progress as progress_bar
from ..errors import InputError
from ..precision import perturbed_forward, runtime
from ..models.targets import ScoreKind
from .base import UNBOUNDED, UNIT, MetricResult, ValueRange, check_maps, pixel_stats, register_metric, trapezoid

Substrate = Literal["blur", "black", "mean", "random", "zero"]
SUBSTRATES = get_args(Substrate)
Protocol = Literal["paper", "rise_code", "tis_code"]
PROTOCOLS = {
    "paper": dict(insertion="blur", deletion="blur", start_point=True, space="pixel", ties="raster",
                  auc="trapezoid"),
    "rise_code": dict(insertion="blur", deletion="zero", start_point=True, space="pixel", ties="raster",
                      auc="trapezoid"),
    "tis_code": dict(insertion="blur", deletion="blur", start_point=False, space="normalised",
                     ties="reverse_raster", auc="mean"),
}
TIE_BREAKS = {
    "raster": "equal saliency -> lower flat pixel index first (stable descending sort)",
    "reverse_raster": "equal saliency -> higher flat pixel index first (flip of a stable ascending argsort, "
                      "TIS metrics/utils.py)",
}
TIE_BREAK = TIE_BREAKS["raster"]
AUC_RULES = {
    "trapezoid": "trapezoid over xs",
    "mean": "mean of the n per-step scores after steps 1..n (TIS)",
}


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


def tis_blur(x: Tensor, size: int = 11, sigma: float = 5.0) -> Tensor:
    """torchvision ``gaussian_blur(x, [size, size], [sigma, sigma])`` as TIS's ``blur_baseline`` calls it
    (``metrics/utils.py``): the 1-D kernel samples ``exp(-t^2 / (2 sigma^2))`` at
    ``t = linspace(-(size-1)/2, (size-1)/2, size)``, normalised to sum 1; the 2-D kernel is its outer
    product; the image is padded by ``size // 2`` with ``mode="reflect"`` (no edge repetition) and
    convolved per channel (no zero padding, unlike :func:`blur`)."""
    half = (size - 1) * 0.5
    t = torch.linspace(-half, half, size, dtype=x.dtype, device=x.device)
    k1 = torch.exp(-0.5 * (t / sigma) ** 2)
    k1 = k1 / k1.sum()
    k = (k1[:, None] * k1[None, :])[None, None].expand(x.shape[1], 1, size, size)
    p = size // 2
    if min(x.shape[-2:]) <= p:
        raise InputError(f"the TIS blur pads by reflection ({p} pixels): images must be larger than {p} x {p}, "
                         f"got {tuple(x.shape[-2:])}.")
    return F.conv2d(F.pad(x, (p, p, p, p), mode="reflect"), k, groups=x.shape[1])


def make_substrate(adapter, x: Tensor, kind: str, *, seed: Optional[int] = 0, blur_kernel: int = 11,
                   blur_sigma: float = 5.0, space: str = "pixel") -> Tensor:
    """The substrate images (B, 3, H, W) in normalised space (see the module docstring).

    ``space="normalised"`` builds them as the TIS code does, on the normalised tensor itself."""
    if space == "normalised":
        if kind == "blur":
            return tis_blur(x, blur_kernel, blur_sigma)
        if kind in ("black", "zero"):
            return torch.zeros_like(x)
        if kind == "mean":
            return x.mean(dim=(1, 2, 3), keepdim=True).expand_as(x).contiguous()
        if kind == "random":  # one seeded noise image for every image: independent of batch composition
            noise = torch.rand((1, *x.shape[1:]), generator=generator(seed), dtype=torch.float32)
            return noise.to(device=x.device, dtype=x.dtype).expand_as(x).contiguous()
        raise InputError(f"unknown substrate '{kind}'; choose one of {', '.join(SUBSTRATES)}.")
    mean, std = pixel_stats(adapter, x)
    if kind == "blur":
        return blur(x, blur_kernel, blur_sigma)
    if kind == "black":
        return ((0.0 - mean) / std).expand_as(x).contiguous()
    if kind == "mean":
        return x.mean(dim=(2, 3), keepdim=True).expand_as(x).contiguous()
    if kind == "random":  # one seeded noise image for every image: independent of batch composition
        noise = torch.rand((1, *x.shape[1:]), generator=generator(seed), dtype=torch.float32)
        return ((noise.to(device=x.device, dtype=x.dtype) - mean) / std).expand_as(x).contiguous()
    if kind == "zero":
        return torch.zeros_like(x)
    raise InputError(f"unknown substrate '{kind}'; choose one of {', '.join(SUBSTRATES)}.")


def saliency_rank(maps: Tensor, ties: str = "raster") -> Tensor:
    """(B, H*W) rank of every pixel (0 = most salient); ties in raster order (``"raster"``) or in
    reverse raster order (``"reverse_raster"``: TIS's ``flip(argsort(...))``, see the module docstring)."""
    flat = maps.reshape(maps.shape[0], -1)
    if ties == "raster":
        order = torch.sort(flat, dim=1, descending=True, stable=True).indices
    elif ties == "reverse_raster":
        order = torch.sort(flat, dim=1, stable=True).indices.flip(-1)
    else:
        raise InputError(f"unknown tie order '{ties}'; choose one of {', '.join(TIE_BREAKS)}.")
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
                  progress: Optional[bool] = None, ties: str = "raster") -> Tensor:
    """(B, len(counts)) target scores after changing the ``counts[k]`` top-ranked pixels of each image."""
    B, C, H, W = x.shape
    K = counts.numel()
    rank = saliency_rank(maps, ties).to(x.device)
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


def raw_to_input(raw_maps, x: Tensor) -> Tensor:
    """Raw native-resolution maps (B, h, w) at the input size: bilinear upsampling
    (``align_corners=False``, as torchvision ``Resize`` on a tensor does when enlarging); maps already at
    the input size are returned unchanged."""
    from ..explanation import upsample

    raw = torch.as_tensor(raw_maps).to(device=x.device, dtype=torch.float32)
    if raw.dim() != 3 or raw.shape[0] != x.shape[0]:
        raise InputError(f"raw_maps must be (B, h, w) with B = {x.shape[0]}, got {tuple(raw.shape)}.")
    if tuple(raw.shape[-2:]) != tuple(x.shape[-2:]):
        raw = upsample(raw, tuple(x.shape[-2:]))
    if not torch.isfinite(raw).all():
        raise InputError("raw_maps contain NaN or infinite values.")
    return raw


def _run(mode: str, model, x: Tensor, maps, targets, *, protocol: str, substrate: Optional[str], n_steps: int,
         score: str, blur_kernel: int, blur_sigma: float, seed: Optional[int], batch_size, progress,
         precision=None, compile: Optional[bool] = None, raw_maps=None) -> MetricResult:
    from ..models import wrap_model

    adapter = wrap_model(model)
    x = adapter.check_input(x)
    maps = check_maps(maps, x)
    proto = PROTOCOLS[protocol]
    sub = substrate if substrate is not None else proto[mode]
    tgt = adapter.resolve_target(targets, x=x)
    kind = adapter.default_score(tgt) if score == "auto" else score
    H, W = x.shape[-2:]
    counts = step_counts(H * W, n_steps, proto["start_point"])
    if protocol == "tis_code" and raw_maps is not None:
        maps = raw_to_input(raw_maps, x)
    with torch.no_grad():
        subst = make_substrate(adapter, x, sub, seed=seed, blur_kernel=blur_kernel, blur_sigma=blur_sigma,
                               space=proto["space"])
    with runtime(precision, compile):  # the curves' forward passes only (vitlens.precision)
        curves = causal_curves(adapter, x, maps, tgt, mode=mode, substrate=subst, counts=counts, score=kind,
                               batch_size=batch_size, progress=progress, ties=proto["ties"]).cpu()
    xs = counts.double() / (H * W)
    if proto["auc"] == "mean":
        values = curves.double().mean(1).float()
    else:
        values = trapezoid(curves.double(), xs).float()
    full = dict(protocol=protocol, substrate=sub, n_steps=int(n_steps), score=kind, blur_kernel=blur_kernel,
                blur_sigma=blur_sigma, seed=seed, start_point=proto["start_point"],
                pixels_per_step=math.ceil(H * W / int(n_steps)), tie_break=TIE_BREAKS[proto["ties"]],
                substrate_space=proto["space"], auc=AUC_RULES[proto["auc"]],
                ranked="raw_maps upsampled" if (protocol == "tis_code" and raw_maps is not None) else "maps")
    return MetricResult(values=values, curves=curves, xs=xs.float(), protocol=full)


def _auc_range(protocol: dict) -> ValueRange:
    """AUCs of softmax probabilities over x in [0, 1] lie in [0, 1]; of logits they are unbounded."""
    return UNIT if protocol.get("score", "prob") == "prob" else UNBOUNDED


@register_metric("insertion", higher_is_better=True, value_range=_auc_range)
def insertion(model, x: Tensor, maps, targets=None, *, protocol: Protocol = "paper",
              substrate: Optional[Substrate] = None, n_steps: int = 224, score: ScoreKind = "prob", blur_kernel: int = 11, blur_sigma: float = 5.0,
              seed: Optional[int] = 0, batch_size: Optional[int] = None, progress: Optional[bool] = None,
              precision=None, compile: Optional[bool] = None, raw_maps=None) -> MetricResult:
    """Insertion AUC (RISE Sec. 4.1): start from the substrate, restore the most salient pixels first.

    Higher is better. ``substrate=None`` takes the protocol's (``"blur"`` for every named protocol);
    see the module docstring for the ranking, steps, curve end points (x = 0 is the pure substrate
    unless ``protocol="tis_code"``), score (softmax probability), tie-breaking (raster order; reverse
    raster for ``"tis_code"``) and the AUC (trapezoid; mean of the n scores for ``"tis_code"``).
    ``raw_maps`` (B, h, w): the method's raw native maps, ranked instead of ``maps`` by ``"tis_code"``.
    Returns ``values`` (B,) AUC, ``curves`` (B, n_points), ``xs`` (n_points,).

    Example::

        >>> res = insertion(model, x, exp.maps, exp.targets, substrate="blur")
        >>> res.values.shape, res.curves.shape        # (B,), (B, n_steps + 1)
    """
    return _run("insertion", model, x, maps, targets, protocol=protocol, substrate=substrate, n_steps=n_steps,
                score=score, blur_kernel=blur_kernel, blur_sigma=blur_sigma, seed=seed, batch_size=batch_size,
                progress=progress, precision=precision, compile=compile, raw_maps=raw_maps)


@register_metric("deletion", higher_is_better=False, value_range=_auc_range)
def deletion(model, x: Tensor, maps, targets=None, *, protocol: Protocol = "paper",
             substrate: Optional[Substrate] = None, n_steps: int = 224, score: ScoreKind = "prob", blur_kernel: int = 11, blur_sigma: float = 5.0,
             seed: Optional[int] = 0, batch_size: Optional[int] = None, progress: Optional[bool] = None,
             precision=None, compile: Optional[bool] = None, raw_maps=None) -> MetricResult:
    """Deletion AUC (RISE Sec. 4.1): replace the most salient pixels by the substrate first.

    Lower is better. ``substrate=None`` takes the protocol's (``"blur"`` for ``"paper"`` and
    ``"tis_code"``, ``"zero"`` for ``"rise_code"``); see the module docstring for the ranking, steps,
    curve end points (x = 0 is the untouched image unless ``protocol="tis_code"``), score (softmax
    probability), tie-breaking (raster order; reverse raster for ``"tis_code"``), the AUC (trapezoid;
    mean of the n scores for ``"tis_code"``) and ``raw_maps``.

    Returns:
        :class:`MetricResult`: ``values`` (B,) AUCs, ``curves`` (B, n points), ``xs`` (n points,), ``protocol``.

    Example::

        >>> res = deletion(model, x, exp.maps, exp.targets, protocol="rise_code")
    """
    return _run("deletion", model, x, maps, targets, protocol=protocol, substrate=substrate, n_steps=n_steps,
                score=score, blur_kernel=blur_kernel, blur_sigma=blur_sigma, seed=seed, batch_size=batch_size,
                progress=progress, precision=precision, compile=compile, raw_maps=raw_maps)
