"""Max-sensitivity (Yeh, Hsieh, Suggala, Inouye & Ravikumar, "On the (In)fidelity and Sensitivity of
Explanations", NeurIPS 2019, Def. 3.1), as Captum's ``sensitivity_max`` with the TIS protocol.

    SENS_max(Phi, x) = max_{||d||_inf <= r} ||Phi(x + d) - Phi(x)||_F / ||Phi(x)||_F

estimated by Monte Carlo with ``n_samples`` (10) perturbations d ~ U[-r, r]^(3 x H x W) (r = 0.02, in the
model's normalised input space, as Captum's ``default_perturb_func`` adds noise to the given inputs).
Noise: for each image, one ``uniform_(-r, r)`` draw of shape (n, 3, H, W) from a CPU generator seeded
with ``seed``: Captum's draw for a batch of one image (how TIS's ``evaluate.py`` calls it, one image at a
time; Captum uses the global generator), so an image's value never depends on the other images of its
batch. A zero explanation norm is replaced by 1 (Captum).
``Phi(x)`` is the given ``maps``; ``Phi(x + d)`` comes from ``explainer`` on the perturbed batch,
explaining the same targets. Lower is better.

``protocol="tis_code"``: as the TIS authors' ``metrics/sensitivity.py`` (Captum ``sensitivity_max``,
``n_perturb_samples=10``, ``perturb_radius=0.02``, ``config/metric/sensitivity_max.yaml``) sees the
maps: the method's *raw* output at its native resolution (the wrapper reshapes ``method(...)`` to
(1, 1, h, w) without upsampling or normalising: a 14 x 14 token map for TIS, a 224 x 224 pixel map for
RISE / ViT-CX / IG). ``Phi(x)`` is ``raw_maps`` (what ``vitlens bench`` stored for the image; Captum
recomputes it, which for a random method is a new draw), else one ``explain(normalise=False)`` call.
``Phi(x + d_i)`` comes from ``explain(normalise=False)`` on the i-th perturbed copies of the batch with
seed ``seed + 1 + i``: in TIS's run each call of a random method draws new masks/noise from the global
generator, except where the authors' wrapper fixes the draw once at construction (RISE: ``RISEWrapper``
calls ``generate_masks`` in ``__init__``), for which the same ``seed`` is reused
(:data:`FIXED_DRAW_METHODS`).
"""
from __future__ import annotations

from typing import Callable, Literal, Optional

import torch
from torch import Tensor

from ..batching import batch_slices, generator
from ..batching import progress as progress_bar
from ..errors import InputError
from .base import MetricResult, ValueRange, check_maps, register_metric


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


#: methods whose random draw the TIS comparison wrappers fix once (``comparison_methods/rise_wrapper.py``)
FIXED_DRAW_METHODS = frozenset({"rise"})


def _noise(x: Tensor, n: int, radius: float, seed: Optional[int]) -> Tensor:
    """(B * n, 3, H, W) perturbations, image-major: each image's n draws from a generator seeded with ``seed``."""
    one = (n, *x.shape[1:])
    draws = [torch.empty(one, dtype=torch.float32).uniform_(-radius, radius, generator=generator(seed))
             for _ in range(x.shape[0])]  # per image (a handful): the same draws whatever the batch
    return torch.cat(draws).to(device=x.device, dtype=x.dtype)


def _raw_native(exp) -> Tensor:
    """The raw native-resolution maps of an ``explain(normalise=False)`` result."""
    return (exp.token_maps if exp.token_maps is not None else exp.maps).float()


def _tis_code(adapter, x: Tensor, tgt, raw_maps, method, method_params, radius, n, seed) -> Tensor:
    from ..api import explain

    if method is None:
        raise InputError("max_sensitivity protocol 'tis_code' needs method='<name>' (and method_params).")
    params = dict(method_params or {})
    B = x.shape[0]
    if raw_maps is None:
        ref = _raw_native(explain(adapter, x, method=method, target=tgt, seed=seed, progress=False,
                                  normalise=False, **params))
    else:
        ref = torch.as_tensor(raw_maps).to(device=x.device, dtype=torch.float32)
    ref = ref.reshape(B, -1).double()
    xp = (x.repeat_interleave(n, dim=0) + _noise(x, n, radius, seed)).reshape(B, n, *x.shape[1:])
    diffs = torch.empty(B, n, dtype=torch.float64, device=x.device)
    fixed = method in FIXED_DRAW_METHODS
    base = 0 if seed is None else int(seed)
    for i in range(n):  # one explain call per Monte Carlo sample (each with its own seed), batched over images
        s_i = seed if fixed else base + 1 + i
        pm = _raw_native(explain(adapter, xp[:, i], method=method, target=tgt, seed=s_i, progress=False,
                                 normalise=False, **params)).reshape(B, -1).double()
        if pm.shape != ref.shape:
            raise InputError(f"max_sensitivity: raw maps of shape {tuple(pm.shape)} do not match the stored raw "
                             f"maps {tuple(ref.shape)}.")
        diffs[:, i] = torch.linalg.vector_norm(pm - ref, dim=1)
    norm = torch.linalg.vector_norm(ref, dim=1)
    norm = torch.where(norm == 0, torch.ones_like(norm), norm)
    return (diffs / norm[:, None]).max(1).values


@register_metric("max_sensitivity", higher_is_better=False, value_range=ValueRange(0.0, None))
def max_sensitivity(model, x: Tensor, maps, targets=None, *, explainer: Optional[Callable] = None,
                    method: Optional[str] = None, method_params: Optional[dict] = None, radius: float = 0.02,
                    n_samples: int = 10, seed: Optional[int] = 0, batch_size: Optional[int] = None,
                    progress: Optional[bool] = None, protocol: Literal["default", "tis_code"] = "default", raw_maps=None) -> MetricResult:
    """Max-sensitivity per image (see the module docstring).

    Args:
        explainer: ``callable(x) -> (B, H, W) maps`` (for a method of another library); or
        method, method_params: a :func:`vitlens.methods` name and its parameters, run through
            :func:`vitlens.explain` (normalised maps, like the ``maps`` it is compared with) on the
            resolved targets with the same ``seed``.
        radius: L-infinity radius r of the uniform noise (0.02).
        n_samples: Monte Carlo samples per image (10).
        batch_size: perturbed images per explainer call (default: all ``B * n_samples`` at once).

    Returns:
        :class:`MetricResult`: ``values`` (B,) the largest relative change of the map over the perturbations.

    Example::

        >>> res = max_sensitivity(model, x, exp.maps, exp.targets, method="legrad", n_samples=10)
    """
    from ..models import wrap_model

    adapter = wrap_model(model)
    x = adapter.check_input(x)
    maps = check_maps(maps, x)
    if int(n_samples) < 1:
        raise InputError(f"n_samples must be >= 1, got {n_samples}.")
    tgt = adapter.resolve_target(targets, x=x)
    if protocol == "tis_code":
        vals = _tis_code(adapter, x, tgt, raw_maps, method, method_params, radius, int(n_samples), seed)
        return MetricResult(values=vals.float().cpu(), curves=None,
                            protocol=dict(protocol="tis_code", radius=radius, n_samples=int(n_samples), seed=seed,
                                          norm="fro", maps="raw native", method=method,
                                          method_params=dict(method_params or {}),
                                          perturbed_seeds="same" if method in FIXED_DRAW_METHODS else "seed+1+i"))
    fn = _make_explainer(adapter, explainer, method, method_params, tgt, seed)
    B = x.shape[0]
    n = int(n_samples)
    xp = x.repeat_interleave(n, dim=0) + _noise(x, n, radius, seed)
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
