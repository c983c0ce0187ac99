"""Relevance propagation through a Vision Transformer, built on the adapter's canonical blocks.

Two engines share this module:

* **Gradient-space rules** (:func:`attnlrp_relevance`): AttnLRP (Achtibat et al., ICML 2024) and CP-LRP
  (Ali et al., ICML 2022) written as one modified backward pass, so that ``input * gradient`` at the
  embedded tokens *is* the LRP relevance. The rules are installed as temporary forward hooks on the
  model's own ``nn.LayerNorm`` / ``nn.Linear`` / activation modules plus hooks on the canonical block's
  ``q``/``k``/``v``/``attn`` sites; every hook is removed afterwards, so the model is left exactly as it
  was (no weights touched, no copies).
* **Relevance-space rules** (:func:`chefer_propagate`): the explicit layer-by-layer propagation of
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

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..batching import resolve_batch_size
from ..errors import UnsupportedModelError
from ..models.base import ViTAdapter
from ..models.blocks import BlockSpec
from ..models.targets import Target

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


@contextmanager
def attnlrp_rules(adapter: ViTAdapter, *, eps: float = 0.0, conservative: bool = False) -> Iterator[dict]:
    """Install the AttnLRP (or CP-LRP) gradient rules as temporary hooks; yields the block-site hooks.

    Forward hooks go on every ``nn.LayerNorm`` (constant normaliser) and ``nn.Linear`` (epsilon rule) of
    the model and on each block's activation module (identity rule); they are all removed on exit.
    The yielded dict of block-site hooks is passed to :meth:`ViTAdapter.run_blocks`.
    """
    handles = []

    def ln_hook(mod, inp, out):
        return layer_norm_const(mod, inp[0])

    def lin_hook(mod, inp, out):
        return epsilon_grad(out, eps)

    def act_hook(mod, inp, out):
        return _IdentityRule.apply(inp[0], out.detach())

    try:
        for m in adapter.module.modules():
            if isinstance(m, nn.LayerNorm):
                handles.append(m.register_forward_hook(ln_hook))
            elif isinstance(m, nn.Linear) and eps != 0:
                handles.append(m.register_forward_hook(lin_hook))
        for spec in adapter.blocks:
            handles.append(spec.modules["act"].register_forward_hook(act_hook))
        fused = [("qkv" in spec.modules and not isinstance(spec.modules.get("q"), nn.Linear)) for spec in adapter.blocks]

        def qk(layer: int, t: Tensor) -> Tensor:
            if fused[layer]:  # fused projection called functionally: its epsilon rule is applied here
                t = epsilon_grad(t, eps)
            return t.detach() if conservative else scale_grad(t, 0.5)

        def v(layer: int, t: Tensor) -> Tensor:
            if fused[layer]:
                t = epsilon_grad(t, eps)
            return t if conservative else scale_grad(t, 0.5)

        def attn(layer: int, a: Tensor) -> Tensor:
            return a if conservative else scale_grad(a, 0.5)

        yield {"q": qk, "k": qk, "v": v, "attn": attn}
    finally:
        for h in handles:
            h.remove()


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


def attnlrp_relevance(adapter: ViTAdapter, x: Tensor, target, *, eps: float = 0.0,
                      conservative: bool = False) -> tuple[Tensor, Tensor, Target, Tensor]:
    """One modified backward pass: token relevance (B, T) at the embedded tokens.

    Returns ``(token_relevance, score, target, outputs)``; ``token_relevance[b, t]`` is the sum over
    channels of ``emb * grad`` for token ``t`` (prefix tokens included), ``score`` the explained
    quantity (its total relevance before bias absorption).
    """
    with attnlrp_rules(adapter, eps=eps, conservative=conservative) as sites, torch.enable_grad():
        emb = adapter.embed(x).detach().requires_grad_(True)
        out = adapter.head(adapter.run_blocks(emb, hooks=sites))
        tgt = adapter.resolve_target(target, outputs=out.detach(), batch=x.shape[0])
        s = relevance_score(adapter, out, tgt)
        (g,) = torch.autograd.grad(s.sum(), emb)
    rel = (emb.detach().float() * g.float()).sum(-1)
    return rel, s.detach(), tgt, out.detach()


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


def _linear_params(mod: nn.Module) -> Tensor:
    if isinstance(mod, nn.MultiheadAttention):
        return mod.in_proj_weight
    w = getattr(mod, "weight", None)
    if not isinstance(w, Tensor) or w.dim() != 2:
        raise UnsupportedModelError(f"relevance propagation needs a linear layer, got {type(mod).__name__}.")
    return w


def qkv_weight(spec: BlockSpec) -> Tensor:
    """(3 * heads * hd, D) weight laid out as [q; k; v] (fused or separate projections)."""
    m = spec.modules
    if "qkv" in m and m["qkv"] is not None:
        return _linear_params(m["qkv"])
    return torch.cat([_linear_params(m[n]) for n in ("q", "k", "v")], 0)


def proj_weight(spec: BlockSpec) -> Tensor:
    return _linear_params(spec.modules["proj"])


@dataclass
class BlockRecord:
    """What the Chefer relevance propagation needs from one block's forward pass."""

    x: Tensor
    h: Tensor
    q: Tensor
    k: Tensor
    v: Tensor
    attn: Tensor
    ctx: Tensor
    branch1: Tensor
    mid: Tensor
    h2: Tensor
    branch2: Tensor


def record_forward(adapter: ViTAdapter, x: Tensor) -> tuple[Tensor, Tensor, list[BlockRecord]]:
    """Forward pass (with autograd) recording every block's intermediates; returns (emb, tokens, records).

    ``records[l].attn`` stays in the graph so that the gradient of the score w.r.t. it can be taken.
    """
    rec: dict[str, list[Tensor]] = {s: [] for s in ("input", "norm1", "q", "k", "v", "attn", "context",
                                                    "attn_branch", "mid", "norm2", "mlp_branch")}

    def hook(site):
        return lambda l, t: rec[site].append(t)

    hooks = {s: hook(s) for s in rec}
    emb = adapter.embed(x).detach().requires_grad_(True)
    tokens = adapter.run_blocks(emb, hooks=hooks)
    records = [BlockRecord(*(rec[s][l] for s in rec)) for l in range(adapter.num_blocks)]
    return emb, tokens, records


def block_relprop(spec: BlockSpec, r: BlockRecord, rel: Tensor,
                  matmul_mode: str = "normalize") -> tuple[Tensor, Tensor, Tensor]:
    """Chefer relevance propagation through one canonical block.

    Returns the relevance at the block input (B, N, D), at the attention map (B, heads, N, N) and at
    each head's output A_h v_h (B, heads, N, hd).
    Rules: z+ (alpha=1, beta=0) for linear layers; identity for LayerNorm, the activation, softmax
    and layer-scale (the authors' code); residual additions and the two attention products by
    :func:`add_rule` / :func:`matmul_rule`.
    """
    m = spec.modules
    # out = mid + branch2
    r_mid, r_b2 = add_rule(r.mid.detach(), r.branch2.detach(), rel)
    h2 = r.h2.detach()
    z1 = m["fc1"](h2)
    a1 = m["act"](z1)
    r_a1 = zplus_linear(a1, m["fc2"].weight, r_b2)
    r_h2 = zplus_linear(h2, m["fc1"].weight, r_a1)
    r_mid = r_mid + r_h2
    # mid = x + branch1
    r_x, r_b1 = add_rule(r.x.detach(), r.branch1.detach(), r_mid)
    ctx = r.ctx.detach()
    r_ctx = zplus_linear(ctx, proj_weight(spec), r_b1)
    B, H, N, hd = r.v.shape
    r_ctx = r_ctx.reshape(B, N, H, hd).transpose(1, 2)
    attn, v = r.attn.detach(), r.v.detach()
    r_attn, r_v = matmul_rule(attn, v, r_ctx, matmul_mode)
    q, k = r.q.detach(), r.k.detach()
    r_q, r_kt = matmul_rule(q, k.transpose(-2, -1), r_attn, matmul_mode)  # softmax: identity
    r_k = r_kt.transpose(-2, -1)
    r_qkv = torch.stack([r_q, r_k, r_v], 0).permute(1, 3, 0, 2, 4).reshape(B, N, 3 * H * hd)
    r_h = zplus_linear(r.h.detach(), qkv_weight(spec), r_qkv)
    return r_x + r_h, r_attn, r_ctx


def head_relevance(adapter: ViTAdapter, tokens: Tensor, target: Target) -> Tensor:
    """Relevance at the last block's output tokens (B, T, D) for an initial relevance of 1 (Chefer).

    The head (final norm with its normaliser held constant, pooling, classifier) is one linear map of
    the tokens; its z+ rule keeps the positive parts of ``tokens * d score / d tokens`` and normalises
    them to sum to 1 per image.
    """
    ln_handles = [m.register_forward_hook(lambda mod, i, o: layer_norm_const(mod, i[0]))
                  for m in adapter.module.modules() if isinstance(m, nn.LayerNorm)]
    try:
        with torch.enable_grad():
            t = tokens.detach().requires_grad_(True)
            s = relevance_score(adapter, adapter.head(t), target)
            (g,) = torch.autograd.grad(s.sum(), t)
    finally:
        for h in ln_handles:
            h.remove()
    c = (t.detach() * g).clamp(min=0)
    return safe_div(c, c.sum((1, 2), keepdim=True))


@dataclass
class CheferPass:
    """Result of :func:`chefer_propagate` (per-block lists hold ``None`` below ``down_to``)."""

    rel_attn: list  # relevance at each block's attention probabilities (B, heads, T, T)
    grads: Optional[list]  # gradient of the explained score w.r.t. them (B, heads, T, T)
    rel_heads: list  # relevance of each head's output A_h v_h (B, heads, T, hd)
    rel_tokens: Tensor  # relevance at the input of block ``down_to`` (B, T, D)
    records: list
    target: Target
    outputs: Tensor


def chefer_propagate(adapter: ViTAdapter, x: Tensor, target, *, matmul_mode: str = "normalize",
                     need_grads: bool = True, down_to: int = 0) -> CheferPass:
    """Forward + Chefer LRP from the head down to block ``down_to``."""
    with torch.enable_grad():
        emb, tokens, records = record_forward(adapter, x)
        out = adapter.head(tokens)
        tgt = adapter.resolve_target(target, outputs=out.detach(), batch=x.shape[0])
        grads = None
        if need_grads:
            s = relevance_score(adapter, out, tgt)
            grads = [g.detach() for g in torch.autograd.grad(s.sum(), [r.attn for r in records])]
    with torch.no_grad():
        rel = head_relevance(adapter, tokens, tgt).to(tokens.dtype)
        rel_attn: list = [None] * adapter.num_blocks
        rel_heads: list = [None] * adapter.num_blocks
        for l in reversed(range(down_to, adapter.num_blocks)):
            rel, rel_attn[l], rel_heads[l] = block_relprop(adapter.blocks[l], records[l], rel, matmul_mode)
    return CheferPass(rel_attn, grads, rel_heads, rel, records, tgt, out.detach())


def pooled_row(adapter: ViTAdapter, mat: Tensor) -> Tensor:
    """The row of a (B, T, T) token-to-token matrix that the head reads: the CLS row, or the mean of
    the patch rows for average-pooled models; returned for the patch columns only (B, N)."""
    P = adapter.num_prefix_tokens
    if adapter.pool == "cls" and adapter.cls_index is not None:
        row = mat[:, adapter.cls_index]
    else:
        row = mat[:, P:].mean(1)
    return row[:, P:]


def cat_targets(targets: list[Target]) -> Target:
    """Concatenate the resolved targets of consecutive batch slices."""
    if len(targets) == 1:
        return targets[0]
    text = None if any(t.text is None for t in targets) else torch.cat([t.text for t in targets])
    return Target(torch.cat([t.index for t in targets]), [l for t in targets for l in t.labels], text,
                  torch.cat([t.is_text for t in targets]))
