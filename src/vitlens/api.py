"""The top-level ``vitlens.explain`` and ``vitlens.methods`` functions."""
from __future__ import annotations

from contextlib import nullcontext
from typing import Optional, Union

import torch
from torch import Tensor, nn

from .errors import InputError, did_you_mean
from .explanation import Explanation, minmax, upsample
from .methods import get_method, method_names
from .models import ViTAdapter, wrap_model
from .models.targets import TargetLike


def methods() -> list[str]:
    """Names of the available explanation methods."""
    return method_names()


def explain(model: Union[ViTAdapter, nn.Module], x: Tensor, method: str = "tis", target: TargetLike = None,
            *, seed: Optional[int] = 0, batch_size: Optional[int] = None, progress: Optional[bool] = None,
            normalise: bool = True, with_scores: bool = False, precision: Optional[str] = None,
            compile: Optional[bool] = None, **params) -> Explanation:
    """Explain the model's decision on a batch of images.

    Args:
        model: a :class:`ViTAdapter` (from :func:`vitlens.load_model`) or a supported ``nn.Module``.
        x: (B, 3, H, W) batch in the model's normalised space (``model.preprocess(images)``).
        method: one of :func:`methods`.
        target: ``None`` (predicted class), an int, a list (one per image), a class name, or a
            text prompt for CLIP-style models.
        seed: seed of every random choice (K-Means initialisation, noise, random masks).
        batch_size: forward-pass batch size for perturbation methods (automatic when None).
        progress: show a progress bar (default: when stderr is a terminal).
        normalise: min-max normalise each map to [0, 1] (a constant map becomes 0).
        with_scores: also report the target's probability (similarity for prompts) on the clean
            image, computing one extra forward pass if the method did not.
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"`` for the perturbed forward passes of
            perturbation methods (default: fp32 on the CPU, bf16 on CUDA; see :mod:`vitlens.precision`).
            Gradient/attention methods stay fp32 unless a precision is given here explicitly, which
            runs the whole method under autocast.
        compile: ``torch.compile`` the batched forward paths (falls back to eager with a warning).
        **params: method parameters (see each method's docstring).
    Returns:
        an :class:`Explanation`; ``maps`` are at input resolution (token maps are upsampled bilinearly).
    """
    adapter = wrap_model(model)
    info = get_method(method)
    unknown = set(params) - set(info.defaults)
    if unknown:
        first = sorted(unknown)[0]
        raise InputError(f"unknown parameter(s) for method '{method}': {', '.join(sorted(unknown))}."
                         f"{did_you_mean(first, info.defaults)} It accepts: {', '.join(sorted(info.defaults)) or 'none'}.")
    x = adapter.check_input(x)
    from .precision import autocast, check_precision, runtime

    explicit = check_precision(precision)
    whole = autocast(x.device, explicit) if explicit is not None and info.kind != "perturbation" else nullcontext()
    with runtime(explicit, compile), whole:
        res = info.fn(adapter, x, target, seed=seed, batch_size=batch_size, progress=progress, **params)
    size = tuple(x.shape[-2:])
    token_maps = res.token_maps
    if token_maps is not None:
        token_maps = token_maps.detach().float()
        if normalise:
            token_maps = minmax(token_maps)
    if res.maps is not None:
        maps = res.maps.detach().float()
    elif token_maps is not None:
        maps = upsample(token_maps, size)
    else:
        raise RuntimeError(f"method '{method}' returned no map")  # a bug in the method, not user input
    if not torch.isfinite(maps).all():
        raise RuntimeError(f"method '{method}' produced non-finite values")
    if normalise:
        maps = minmax(maps)
    scores = None
    if with_scores:
        outputs = res.outputs
        if outputs is None:
            with torch.no_grad():
                outputs = adapter.forward(x)
        kind = "similarity" if res.target.any_text else "prob"
        with torch.no_grad():
            scores = adapter.score(outputs.detach(), res.target, kind).float().cpu()
    full = dict(info.defaults)
    full.update(params)
    full["seed"] = seed
    if explicit is not None:
        full["precision"] = explicit
    return Explanation(maps=maps, token_maps=token_maps, targets=res.target.index.detach().cpu(),
                       labels=list(res.target.labels), method=method, params=full, scores=scores,
                       extras=res.extras)
