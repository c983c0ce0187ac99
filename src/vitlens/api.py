"""The top-level ``vitlens.explain`` and ``vitlens.methods`` functions."""
from __future__ import annotations

from contextlib import nullcontext
from typing import Optional, Union

import torch
from torch import Tensor, nn

from .explanation import Explanation, minmax, upsample
from .methods import get_method, method_names
from .models import ViTAdapter, wrap_model
from .models.targets import TargetLike


def methods() -> list[str]:
    """Names of the available explanation methods.

    Returns:
        the sorted names, e.g. ``["attention_cam", ..., "tis", "vitcx"]``; ``vitlens.methods.get_method(name)``
        gives one's metadata and parameters.
    """
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
        an :class:`Explanation`: ``maps`` (B, H, W) at input resolution in [0, 1] (token maps are
        upsampled bilinearly), ``token_maps`` (B, gh, gw) for token-level methods (else ``None``),
        ``targets`` (B,) class indices (-1 for prompts), ``labels``, ``params`` (defaults filled in).

    Raises:
        InputError: a bad batch, an unknown parameter (or an old name, named with its replacement), a
            value of the wrong type or outside its choices. UnsupportedModelError: the model lacks what
            the method needs (a CLS token, readable attention, a text tower...). TargetError: a target
            that cannot be resolved.

    Example::

        >>> model = vitlens.load_model("vit_tiny_patch16_224.augreg_in21k_ft_in1k", weights=...)
        >>> x = model.preprocess(["cat.jpg"])
        >>> exp = vitlens.explain(model, x, "legrad", target="tabby cat")
        >>> exp.maps.shape, exp.token_maps.shape
        (torch.Size([1, 224, 224]), torch.Size([1, 14, 14]))
    """
    adapter = wrap_model(model)
    info = get_method(method)
    params = info.check(adapter, params)  # names, types, choices; the model has what the method needs
    x = adapter.check_input(x)
    from .precision import autocast, check_precision, runtime

    explicit = check_precision(precision)
    # perturbation methods apply the precision to their perturbed passes only; others run under autocast
    whole = autocast(x.device, explicit) if explicit is not None and not info.kind.perturbs_inputs else nullcontext()
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
