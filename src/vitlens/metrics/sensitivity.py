"""Max-sensitivity (Yeh, Hsieh, Suggala, Inouye & Ravikumar, "On the (In)fidelity and Sensitivity of
Explanations", NeurIPS 2019, Def. 3.1), as Captum's ``sensitivity_max`` with the TIS protocol.

    SENS_max(Phi, x) = max_{||d||_inf <= r} ||Phi(x + d) - Phi(x)||_F / ||Phi(x)||_F

estimated by Monte Carlo with ``n_samples`` (10) perturbations d ~ U[-r, r]^(3 x H x W) (r = 0.02, in the
model's normalised input space, as Captum's ``default_perturb_func`` adds noise to the given inputs).
Noise layout and values equal Captum's on the same seed: one ``uniform_(-r, r)`` draw of shape
(B * n, 3, H, W) from a CPU generator seeded with ``seed`` (Captum uses the global generator), rows
ordered image-major (``repeat_interleave``). A zero explanation norm is replaced by 1 (Captum).
``Phi(x)`` is the given ``maps``; ``Phi(x + d)`` comes from ``explainer`` on the perturbed batch,
explaining the same targets. Lower is better.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from ..batching import batch_slices, generator, progress as progress_bar
from ..errors import InputError
from .base import MetricResult, check_maps, register_metric


def _make_explainer(adapter, explainer, method, method_params, tgt, seed) -> Callable[[Tensor, object], Tensor]:
    if explainer is not None:
        if not callable(explainer):
            raise InputError("explainer must be a callable x -> maps (B, H, W).")
        return lambda xs, t: explainer(xs)
    if method is None:
        raise InputError("max_sensitivity needs an explainer: pass explainer=callable(x) -> maps, "
                         "or method='<name>' (and method_params) for vitlens.explain.")
    from ..api import explain

    params = dict(method_params or {})
    return lambda xs, t: explain(adapter, xs, method=method, target=t, seed=seed, progress=False, **params).maps


@register_metric("max_sensitivity", higher_is_better=False)
def max_sensitivity(model, x: Tensor, maps, targets=None, *, explainer: Optional[Callable] = None,
                    method: Optional[str] = None, method_params: Optional[dict] = None, radius: float = 0.02,
                    n_samples: int = 10, seed: Optional[int] = 0, batch_size: Optional[int] = None,
                    progress: Optional[bool] = None) -> MetricResult:
    """Max-sensitivity per image (see the module docstring).

    Args:
        explainer: ``callable(x) -> (B, H, W) maps`` (for a method of another library); or
        method, method_params: a :func:`vitlens.methods` name and its parameters, run through
            :func:`vitlens.explain` (normalised maps, like the ``maps`` it is compared with) on the
            resolved targets with the same ``seed``.
        radius: L-infinity radius r of the uniform noise (0.02).
        n_samples: Monte Carlo samples per image (10).
        batch_size: perturbed images per explainer call (default: all ``B * n_samples`` at once).
    """
    from ..models import wrap_model

    adapter = wrap_model(model)
    x = adapter.check_input(x)
    maps = check_maps(maps, x)
    if int(n_samples) < 1:
        raise InputError(f"n_samples must be >= 1, got {n_samples}.")
    tgt = adapter.resolve_target(targets, x=x)
    fn = _make_explainer(adapter, explainer, method, method_params, tgt, seed)
    B = x.shape[0]
    n = int(n_samples)
    xe = x.repeat_interleave(n, dim=0)
    noise = torch.empty(xe.shape, dtype=torch.float32).uniform_(-radius, radius, generator=generator(seed))
    xp = xe + noise.to(device=x.device, dtype=x.dtype)
    te = tgt.repeat_interleave(n)
    bs = B * n if batch_size is None else max(1, int(batch_size))
    diffs = torch.empty(B * n, dtype=torch.float64, device=x.device)
    ref = maps.repeat_interleave(n, dim=0).reshape(B * n, -1)
    bar = progress_bar(B * n, "max_sensitivity", progress, unit="img")
    for sl in batch_slices(B * n, bs):
        pm = check_maps(fn(xp[sl], te.select(sl)), xp[sl]).reshape(sl.stop - sl.start, -1)
        diffs[sl] = torch.linalg.vector_norm((ref[sl] - pm).double(), dim=1)
        bar.update(sl.stop - sl.start)
    bar.close()
    norm = torch.linalg.vector_norm(maps.reshape(B, -1).double(), dim=1)
    norm = torch.where(norm == 0, torch.ones_like(norm), norm)
    sens = (diffs.reshape(B, n) / norm[:, None])
    return MetricResult(values=sens.max(1).values.float().cpu(), curves=None,
                        protocol=dict(radius=radius, n_samples=n, seed=seed, norm="fro",
                                      method=method, method_params=dict(method_params or {}),
                                      explainer=None if explainer is None else getattr(explainer, "__name__", "callable")))
