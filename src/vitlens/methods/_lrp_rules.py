"""Relevance propagation through a Vision Transformer, built on the adapter's canonical blocks.

The rules of relevance propagation through a Vision Transformer, and what a model must expose for them.
As zennit separates rules from the composites that map them onto a model, the two engines that use these
rules live in their own modules:

* :mod:`._lrp_attnlrp` (**gradient-space rules**): AttnLRP (Achtibat et al., ICML 2024) and CP-LRP
  (Ali et al., ICML 2022) written as one modified backward pass, so that ``input * gradient`` at the
  embedded tokens *is* the LRP relevance. The rules are installed as temporary forward hooks on the
  model's own ``nn.LayerNorm`` / ``nn.Linear`` / activation modules plus hooks on the canonical block's
  ``q``/``k``/``v``/``attn`` sites; every hook is removed afterwards, so the model is left exactly as it
  was (no weights touched, no copies).
* :mod:`._lrp_chefer` (**relevance-space rules**): the explicit layer-by-layer propagation of
  Chefer, Gur & Wolf (CVPR 2021), which needs the relevance of every block's attention map.

Gradient-space formulation (a node ``z`` with modified gradient ``g`` carries relevance ``z * g``):

* linear ``z = W x + b`` (epsilon rule): ``g_z <- g_z * z / (z + eps * sign(z))``; ``eps = 0``
  is LRP-0 (plain gradient); the bias absorbs its share of relevance;
* element-wise non-linearity ``y = f(x)`` (identity rule, AttnLRP eq. 9): ``g_x = g_y * y / x`` so
  ``R_x = R_y``;
* LayerNorm (AttnLRP / Ali et al.): the standard deviation is held constant (detached), so
  the norm is a linear map handled by the epsilon rule;
* softmax (AttnLRP Prop. 3.1): plain gradient * input gives ``R_x = x * (R_s - s * sum(R_s))``, the
  paper's linearisation with a bias term (not conservative on purpose);
* bilinear products ``A v`` and ``q k^T`` (uniform rule, AttnLRP eq. 7): each factor gets
  half of the gradient, so the two inputs share the output relevance equally; the query and key thus
  see 1/4 of the gradient, the value 1/2;
* residual additions: plain gradient, i.e. relevance split in proportion to the summands (epsilon rule).

CP-LRP (``conservative=True``) instead stops the gradient at q and k: the attention matrix is a constant
linear map, so no relevance is lost in the softmax and the value path gets all of it.
"""
from __future__ import annotations

from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..batching import resolve_batch_size
from ..errors import UnsupportedModelError
from ..models.base import ViTAdapter
from ..models.targets import Target

#: the two rules for the attention products A V and Q K^T (:func:`matmul_rule`): the paper's eqs. 8-9
#: (``"normalize"``) or the authors' code (``"half"``)
MatmulRule = Literal["normalize", "half"]


# ---------------------------------------------------------------------------- requirements
def check_lrp_support(adapter: ViTAdapter, method: str) -> None:
    """Raise :class:`UnsupportedModelError` when relevance cannot be propagated through this model."""
    adapter.require("transformer blocks", bool(adapter.blocks), method)
    if adapter.pool not in ("cls", "avg"):
        raise UnsupportedModelError(
            f"method '{method}' propagates relevance through CLS-token or average-pooled heads only; "
            f"{adapter.describe()} pools with '{adapter.pool}'.")
    for i, spec in enumerate(adapter.blocks):
        mods = spec.modules or {}
        missing = [n for n in ("fc1", "act", "fc2") if not isinstance(mods.get(n), nn.Module)]
        if missing:
            raise UnsupportedModelError(
                f"method '{method}' needs the MLP of block {i} as fc1 -> activation -> fc2 modules, but the "
                f"adapter of {adapter.describe()} does not expose {', '.join(missing)} (unknown MLP layout).")
        for n in ("norm1", "norm2"):
            if not isinstance(mods.get(n), nn.LayerNorm):
                raise UnsupportedModelError(
                    f"method '{method}' handles LayerNorm only; block {i} of {adapter.describe()} uses "
                    f"{type(mods.get(n)).__name__} as {n}.")


def check_chefer_support(adapter: ViTAdapter, method: str) -> None:
    """The explicit (relevance-space) engine also needs the attention output to be ``proj(context)``."""
    check_lrp_support(adapter, method)
    for i, spec in enumerate(adapter.blocks):
        inner = spec.modules.get("attn_norm")
        if inner is not None and not isinstance(inner, nn.Identity):
            raise UnsupportedModelError(
                f"method '{method}' needs the attention output to be proj(context); block {i} of "
                f"{adapter.describe()} normalises the context first ({type(inner).__name__}).")
        if not isinstance(spec.modules.get("proj"), nn.Linear):
            raise UnsupportedModelError(f"method '{method}' needs a linear attention projection in block {i} "
                                        f"of {adapter.describe()}.")


def lrp_batch_size(adapter: ViTAdapter, x: Tensor, batch_size: Optional[int]) -> int:
    """Images per propagation: every block's intermediates are kept for the backward pass."""
    tokens = adapter.num_prefix_tokens + (x.shape[-2] // adapter.patch_size[0]) * (x.shape[-1] // adapter.patch_size[1])
    return resolve_batch_size(batch_size, adapter, tokens, x.shape[0],
                              activations_per_token=16 * max(adapter.num_blocks, 1))



# ---------------------------------------------------------------------------- gradient-space rules
class _ScaleGrad(torch.autograd.Function):
    """Identity forward; the backward gradient multiplied by ``factor`` (uniform rule, CP stop)."""

    @staticmethod
    def forward(ctx, x: Tensor, factor: float) -> Tensor:  # type: ignore[override]
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        return g * ctx.factor, None


class _Epsilon(torch.autograd.Function):
    """Identity forward on a linear layer's output ``z``; backward ``g * z / (z + eps * sign(z))``."""

    @staticmethod
    def forward(ctx, z: Tensor, eps: float) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(z)
        ctx.eps = eps
        return z.view_as(z)

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        (z,) = ctx.saved_tensors
        sign = torch.where(z >= 0, 1.0, -1.0).to(z.dtype)
        return g * z / (z + ctx.eps * sign), None


class _IdentityRule(torch.autograd.Function):
    """``y = f(x)`` passed through; backward ``g_x = g_y * y / x`` so that ``x g_x = y g_y`` (R_x = R_y)."""

    @staticmethod
    def forward(ctx, x: Tensor, y: Tensor) -> Tensor:  # type: ignore[override]
        ratio = torch.where(x == 0, torch.zeros_like(x), y / torch.where(x == 0, torch.ones_like(x), x))
        ctx.save_for_backward(ratio)
        return y.clone()

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        (ratio,) = ctx.saved_tensors
        return g * ratio, None


def scale_grad(x: Tensor, factor: float) -> Tensor:
    return _ScaleGrad.apply(x, factor)


def epsilon_grad(z: Tensor, eps: float) -> Tensor:
    return z if eps == 0 else _Epsilon.apply(z, eps)


def layer_norm_const(ln: nn.LayerNorm, x: Tensor) -> Tensor:
    """LayerNorm with the standard deviation detached (a linear map of ``x``)."""
    xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    mean = xf.mean(-1, keepdim=True)
    var = (xf - mean).pow(2).mean(-1, keepdim=True)
    y = (xf - mean) / (var + ln.eps).sqrt().detach()
    if ln.weight is not None:
        y = y * ln.weight.to(y.dtype)
    if ln.bias is not None:
        y = y + ln.bias.to(y.dtype)
    return y.to(x.dtype)


def relevance_score(adapter: ViTAdapter, outputs: Tensor, target: Target) -> Tensor:
    """The quantity whose relevance is propagated, (B,).

    Classifiers: the target's logit (LRP explains pre-softmax outputs). CLIP-style models: the cosine
    similarity between the image embedding and the target's text embedding, with the embedding's norm
    held constant (the same rule as LayerNorm), so that it is linear in the embedding.
    """
    if adapter.supports_text:
        if target.any_text:
            text = target.text
        else:
            text = getattr(adapter, "_class_text", None)
            if text is None:
                adapter.class_logits(outputs)  # raises the adapter's clear error
            text = text[target.index.to(text.device)]
        img = outputs.float()
        img = img / img.norm(dim=-1, keepdim=True).detach()
        return (img * text.to(img.device, img.dtype)).sum(-1)
    logits = adapter.class_logits(outputs)
    return logits.gather(1, target.index.to(logits.device)[:, None])[:, 0]



# ---------------------------------------------------------------------------- relevance-space rules
def safe_div(a: Tensor, b: Tensor) -> Tensor:
    """a / b with 0 where b == 0."""
    return torch.where(b == 0, torch.zeros_like(a), a / torch.where(b == 0, torch.ones_like(b), b))


def zplus_linear(x: Tensor, weight: Tensor, r: Tensor) -> Tensor:
    """LRP-alpha1-beta0 (Bach et al. 2015, used by Chefer et al.): only positive contributions ``x_j w_ij`` share ``R_i``.

    ``x`` (..., in), ``weight`` (out, in), ``r`` (..., out) -> (..., in). Biases are ignored.
    """
    wp, wn = weight.clamp(min=0), weight.clamp(max=0)
    xp, xn = x.clamp(min=0), x.clamp(max=0)
    z = F.linear(xp, wp) + F.linear(xn, wn)
    s = safe_div(r, z)
    return xp * (s @ wp) + xn * (s @ wn)


def _normalise_pair(ru: Tensor, rv: Tensor, r: Tensor) -> tuple[Tensor, Tensor]:
    """Chefer et al.'s normalisation for binary operators: rescale the two inputs' relevance so that they keep their share (by absolute
    sum) and together sum to the output's relevance (per image)."""
    dims = tuple(range(1, r.dim()))
    su, sv, sr = ru.sum(dims, keepdim=True), rv.sum(dims, keepdim=True), r.sum(dims, keepdim=True)
    tot = su.abs() + sv.abs()
    return (ru * safe_div(safe_div(su.abs(), tot) * sr, su),
            rv * safe_div(safe_div(sv.abs(), tot) * sr, sv))


def add_rule(u: Tensor, v: Tensor, r: Tensor) -> tuple[Tensor, Tensor]:
    """Residual addition ``u + v`` (Chefer et al.): z-rule per element, then normalisation."""
    s = safe_div(r, u + v)
    return _normalise_pair(u * s, v * s, r)


def matmul_rule(a: Tensor, b: Tensor, r: Tensor, mode: str = "normalize") -> tuple[Tensor, Tensor]:
    """Product ``a @ b`` (Chefer et al.: the Deep Taylor rule for each factor).

    ``mode="normalize"``: normalised as for the residual (the paper); ``"half"``: each factor's relevance
    divided by 2 (the authors' code).
    """
    s = safe_div(r, a @ b)
    ra = a * (s @ b.transpose(-2, -1))
    rb = b * (a.transpose(-2, -1) @ s)
    if mode == "half":
        return ra / 2, rb / 2
    return _normalise_pair(ra, rb, r)
