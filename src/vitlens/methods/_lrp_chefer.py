"""Chefer, Gur & Wolf's explicit layer-by-layer relevance propagation (the relevance-space engine; rules in
:mod:`._lrp_rules`): every block's intermediates are recorded in one forward pass, then the relevance is
propagated back block by block, keeping the relevance of each attention map."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from ..errors import UnsupportedModelError
from ..models.base import ViTAdapter
from ..models.blocks import BlockSpec
from ..models.targets import Target
from ._lrp_rules import add_rule, layer_norm_const, matmul_rule, relevance_score, safe_div, zplus_linear


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
