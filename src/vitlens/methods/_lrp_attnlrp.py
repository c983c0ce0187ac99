"""AttnLRP / CP-LRP as one modified backward pass (the gradient-space engine; rules in :mod:`._lrp_rules`)."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import Tensor, nn

from ..models.base import ViTAdapter
from ..models.targets import Target
from ._lrp_rules import _IdentityRule, epsilon_grad, layer_norm_const, relevance_score, scale_grad


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
