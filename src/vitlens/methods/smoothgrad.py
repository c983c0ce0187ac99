"""SmoothGrad (Smilkov, Thorat, Kim, Viegas & Wattenberg, "SmoothGrad: removing noise by adding noise", 2017).

Eq. (2): ``M_hat(x) = 1/n sum_{i=1}^n M(x + N(0, sigma^2))`` with ``M`` the gradient of the target
score with respect to the input (Simonyan et al. 2014); gradients are computed with Captum's
``Saliency`` (``abs=False``) on batches of noisy copies.

Protocol choices:

* ``n_samples = 50`` noisy copies; ``sigma = noise_level * (x_max - x_min)`` per image, measured in
  the model's normalised space (the paper's noise level sigma / (x_max - x_min); it recommends 10-20 %,
  default 0.15); ``noise_sigma`` instead fixes sigma in normalised units (Captum ``NoiseTunnel``'s
  ``stdevs``, default 1.0, used as is by TIS's ``comparison_methods/captum_wrapper.py``);
* the noise is drawn from a seeded CPU generator (``vitlens.batching.generator``), once per call as
  (n_samples, 3, H, W) standard normals shared by the images of the batch, so an image's map does not
  depend on its batch companions nor on the device; Captum's ``NoiseTunnel`` computes the same estimator
  but draws from the global RNG. ``noise=`` accepts fixed standard-normal samples;
* ``average="grad"`` averages the raw gradients (the paper, eq. 2); ``"abs_grad"`` averages their
  absolute values (what ``NoiseTunnel(Saliency(f))`` does with Captum's default ``abs=True``);
* the (B, 3, H, W) average is reduced over colour channels by ``reduce`` (default ``"abs_sum"``,
  sum_c |g_c|, the grey-scale rendering of the SmoothGrad authors' saliency library;
  ``"max_abs"`` is Simonyan et al.'s max over channels; see :func:`reduce_channels`);
* F is ``adapter.score`` (probability by default; cosine similarity for CLIP text prompts).
"""
from __future__ import annotations

from typing import Literal, Optional

import torch
from torch import Tensor

from ..batching import batch_slices, generator, resolve_batch_size
from ..batching import progress as progress_bar
from ..errors import InputError
from ..models.base import ViTAdapter
from ..models.targets import PROB_OR_SIMILARITY, ScoreKind
from ._perturbation_utils import Reduce, captum_forward, captum_target_args, clean_pass, reduce_channels
from .base import MethodKind, MethodResult, register
from .integrated_gradients import GRAD_ACTIVATIONS_PER_TOKEN


@register("smoothgrad", kind=MethodKind.GRADIENT, token_level=False, auto_score=PROB_OR_SIMILARITY,
          description="SmoothGrad: input gradients averaged over noisy copies, via Captum (Smilkov et al. 2017)")
def smoothgrad(adapter: ViTAdapter, x: Tensor, target=None, *, seed: Optional[int] = 0,
               batch_size: Optional[int] = None, progress: Optional[bool] = None, n_samples: int = 50,
               noise_level: float = 0.15, average: Literal["grad", "abs_grad"] = "grad", reduce: Reduce = "abs_sum",
               score: ScoreKind = "auto",
               noise: Optional[Tensor] = None, noise_sigma: Optional[float] = None) -> MethodResult:
    """SmoothGrad (pixel maps).

    Args:
        n_samples: number of noisy copies (50).
        noise_level: sigma / (x_max - x_min) per image (0.15).
        average: ``"grad"`` (paper) or ``"abs_grad"`` (Captum's NoiseTunnel(Saliency) default).
        reduce: colour-channel reduction (see :func:`reduce_channels`).
        score: ``"prob"``, ``"logit"``, ``"similarity"`` or ``"auto"``.
        noise: optional fixed (n, 3, H, W) standard-normal samples (then ``n_samples`` is ignored).
        noise_sigma: absolute sigma in the normalised input space (replaces ``noise_level``; Captum's
            ``NoiseTunnel`` default ``stdevs=1.0``).

    Returns:
        :class:`MethodResult` with ``maps`` (B, H, W); ``extras``: ``n_samples``, ``sigma`` (B,), ``score``, ...

    Example::

        >>> exp = vitlens.explain(model, x, "smoothgrad", n_samples=50, noise_level=0.15)
    """
    from captum.attr import Saliency

    B, C, H, W = x.shape
    if noise_level < 0:
        raise InputError(f"smoothgrad noise_level must be >= 0, got {noise_level}.")
    if noise is None:
        if n_samples < 1:
            raise InputError(f"smoothgrad n_samples must be >= 1, got {n_samples}.")
        noise = torch.randn(n_samples, C, H, W, generator=generator(seed, "cpu"))
    elif not isinstance(noise, Tensor) or noise.dim() != 4 or tuple(noise.shape[1:]) != (C, H, W):
        raise InputError(f"smoothgrad noise must be a (n, {C}, {H}, {W}) tensor, got "
                         f"{tuple(noise.shape) if isinstance(noise, Tensor) else type(noise).__name__}.")
    noise = noise.to(device=x.device, dtype=x.dtype)
    n = noise.shape[0]
    outputs, tgt, kind = clean_pass(adapter, x, target, score)
    flat = x.reshape(B, -1)
    if noise_sigma is not None:
        if noise_sigma < 0:
            raise InputError(f"smoothgrad noise_sigma must be >= 0, got {noise_sigma}.")
        sigma = torch.full((B,), float(noise_sigma), device=x.device, dtype=x.dtype)
    else:
        sigma = noise_level * (flat.max(1).values - flat.min(1).values)  # (B,)
    total = B * n
    bs = resolve_batch_size(batch_size, adapter, adapter.num_tokens(x), total,
                            activations_per_token=GRAD_ACTIVATIONS_PER_TOKEN)
    sal = Saliency(captum_forward(adapter, kind))
    acc = torch.zeros(B, C, H, W, device=x.device, dtype=torch.float32)
    with torch.enable_grad(), progress_bar(total, "SmoothGrad samples", progress, unit="img") as bar:
        for sl in batch_slices(total, bs):
            rows = torch.arange(sl.start, sl.stop, device=x.device)
            img, k = rows // n, rows % n
            noisy = (x[img] + sigma[img, None, None, None] * noise[k]).requires_grad_(True)
            g = sal.attribute(noisy, abs=average == "abs_grad",
                              additional_forward_args=captum_target_args(tgt.select(img))).detach().float()
            acc.index_add_(0, img, g)
            bar.update(sl.stop - sl.start)
    acc /= n
    return MethodResult(target=tgt, maps=reduce_channels(acc, reduce), outputs=outputs,
                        extras={"n_samples": n, "sigma": sigma.detach().cpu(), "score": kind,
                                "average": average, "reduce": reduce})
