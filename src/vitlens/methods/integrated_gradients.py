"""Integrated Gradients (Sundararajan, Taly & Yan, "Axiomatic Attribution for Deep Networks", ICML 2017),
computed with Captum's ``IntegratedGradients`` (the implementation the TIS paper used).

Eq. (1): ``IG_i(x) = (x_i - x'_i) * int_0^1 dF(x' + a (x - x'))/dx_i da``, approximated with
``n_steps`` points. Captum's default quadrature, Gauss-Legendre, is the default here
(``ig_method="gausslegendre"``); the paper's own Riemann sum (eq. 3, right end points) is
``ig_method="riemann_right"``; Captum's other rules (``riemann_left``, ``riemann_middle``,
``riemann_trapezoid``) are accepted too.

Protocol choices:

* baseline x': a **black image in the model's normalised space**, i.e. pixel value 0 normalised with
  the adapter's mean/std, ``(0 - mean) / std`` per channel (the paper's black baseline), NOT the
  zero tensor of the normalised space (which is the mean colour; ``baseline="zero"`` gives that);
* F is ``adapter.score``: the target's softmax probability by default (``"logit"`` also offered),
  the cosine similarity for CLIP text prompts;
* the (B, 3, H, W) attributions are reduced over colour channels by ``reduce`` (default
  ``"abs_sum"``, sum_c |IG_c|, the grey-scale rendering of the IG/SmoothGrad authors' saliency code;
  ``"sum"`` keeps completeness; see :func:`reduce_channels`).
"""
from __future__ import annotations

from typing import Literal, Optional

import torch
from torch import Tensor

from ..batching import batch_slices, resolve_batch_size
from ..batching import progress as progress_bar
from ..errors import InputError
from ..models.base import ViTAdapter
from ..models.targets import PROB_OR_SIMILARITY, ScoreKind
from ._perturbation_utils import (
    BaselineLike,
    Reduce,
    baseline_image,
    captum_forward,
    captum_target_args,
    clean_pass,
    reduce_channels,
)
from .base import MethodKind, MethodResult, register

#: Captum's quadrature rules
IGMethod = Literal["gausslegendre", "riemann_right", "riemann_left", "riemann_middle", "riemann_trapezoid"]
#: activations kept per token for a backward pass (forward activations are stored for autograd)
GRAD_ACTIVATIONS_PER_TOKEN = 36


@register("integrated_gradients", kind=MethodKind.GRADIENT, token_level=False, auto_score=PROB_OR_SIMILARITY,
          description="Integrated Gradients from a black image, via Captum (Sundararajan et al. 2017)")
def integrated_gradients(adapter: ViTAdapter, x: Tensor, target=None, *, seed: Optional[int] = 0,
                         batch_size: Optional[int] = None, progress: Optional[bool] = None, n_steps: int = 50,
                         ig_method: IGMethod = "gausslegendre", baseline: BaselineLike = "black",
                         reduce: Reduce = "abs_sum", score: ScoreKind = "auto",
                         convergence_delta: bool = False) -> MethodResult:
    """Integrated Gradients (pixel maps).

    Args:
        n_steps: number of integration points (50).
        ig_method: quadrature rule (see module docstring).
        baseline: ``"black"`` (default), ``"zero"`` (normalised zero = mean colour) or a constant.
        reduce: colour-channel reduction (``"abs_sum"``, ``"sum"``, ``"abs_of_sum"``, ``"max_abs"``, ``"l2"``).
        score: ``"prob"``, ``"logit"``, ``"similarity"`` or ``"auto"``.
        batch_size: images (x steps) per forward/backward pass.
        convergence_delta: also report Captum's completeness check sum(IG) - (F(x) - F(x')) per
            image in ``extras["delta"]`` (costs two extra forward passes per image).
    Returns:
        ``maps`` (B, H, W) (the (B, 3, H, W) attributions are not kept).

    Example::

        >>> exp = vitlens.explain(model, x, "integrated_gradients", n_steps=50, baseline="zero", reduce="sum")
    """
    from captum.attr import IntegratedGradients

    if n_steps < 1:
        raise InputError(f"integrated_gradients n_steps must be >= 1, got {n_steps}.")
    outputs, tgt, kind = clean_pass(adapter, x, target, score)
    base = baseline_image(adapter, x, baseline).expand_as(x)
    B = x.shape[0]
    bs = resolve_batch_size(batch_size, adapter, adapter.num_tokens(x), B * n_steps,
                            activations_per_token=GRAD_ACTIVATIONS_PER_TOKEN)
    ig = IntegratedGradients(captum_forward(adapter, kind))
    maps, deltas = [], []
    per_call = max(1, min(B, bs))  # images per Captum call; Captum batches the steps within it
    with torch.enable_grad(), progress_bar(B, "Integrated Gradients", progress, unit="img") as bar:
        for sl in batch_slices(B, per_call):
            n_img = sl.stop - sl.start
            res = ig.attribute(x[sl], baselines=base[sl], additional_forward_args=captum_target_args(tgt, sl),
                               n_steps=n_steps, method=ig_method, internal_batch_size=max(bs, n_img),
                               return_convergence_delta=convergence_delta)
            attr = res[0] if convergence_delta else res
            if convergence_delta:
                deltas.append(res[1].detach().float())
            maps.append(reduce_channels(attr.detach().float(), reduce))
            bar.update(n_img)
    extras = {"score": kind, "n_steps": n_steps, "ig_method": ig_method, "reduce": reduce}
    if convergence_delta:
        extras["delta"] = torch.cat(deltas).cpu()
    return MethodResult(target=tgt, maps=torch.cat(maps), outputs=outputs, extras=extras)
