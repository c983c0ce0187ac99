"""Shared pieces of the attention-family methods (raw attention, rollout, Chefer, AttentionCAM,
Grad-CAM, TAM, Bidirectional Transformers).

Everything goes through the adapter: attention probabilities are captured with the ``attn`` hook
(which switches the block to explicit softmax, so fused kernels are no obstacle), token tensors with
the other hook sites, and gradients with :func:`torch.autograd.grad` on the captured tensors.
Gradients of a batch are taken of the *sum* of the per-image target scores; images do not interact in
a ViT in eval mode, so this gives every image its own gradient in one backward pass.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Mapping, Optional, Sequence

import torch
from torch import Tensor

from ..batching import batch_slices, resolve_batch_size
from ..batching import progress as progress_bar
from ..errors import InputError
from ..models.base import ViTAdapter
from ..models.capabilities import Capability
from ..models.targets import LOGIT, AutoScore, Target

#: head fusion choices of the attention methods
HeadFusion = Literal["mean", "max", "min"]
#: what the attention-family methods need from a model (declared at registration)
CLS_BLOCKS = (Capability.BLOCKS, Capability.CLS)


def require_cls(adapter: ViTAdapter, method: str) -> int:
    """Index of the CLS token; a clear :class:`UnsupportedModelError` when the model has none."""
    adapter.require_all([Capability.CLS], method)
    return int(adapter.cls_index)


def score_kind(score: str, target: Optional[Target] = None, rule: AutoScore = LOGIT) -> str:
    """The score kind ``score`` resolves to under ``rule`` (default :data:`~vitlens.models.targets.LOGIT`:
    the papers differentiate the pre-softmax class score, one-hot times the logits in the authors' code;
    for CLIP prompts this is ``logit_scale * cosine``)."""
    return rule.resolve(score, target)


def fuse_heads(a: Tensor, how: HeadFusion) -> Tensor:
    """(B, H, T, T) -> (B, T, T) by mean, max or min over heads."""
    if how == "max":
        return a.amax(1)
    if how == "min":
        return a.amin(1)
    return a.mean(1)


def to_grid(adapter: ViTAdapter, x: Tensor, row: Tensor) -> Tensor:
    """(B, T) values over all tokens -> (B, gh, gw) over the patch tokens."""
    gh, gw = adapter.grid_size(x)
    return row[:, adapter.num_prefix_tokens:].reshape(row.shape[0], gh, gw)


@dataclass
class Capture:
    """What :func:`capture` recorded: model outputs, resolved targets, the captured tensors
    ``values[(site, layer)]`` and, for the requested ones, ``grads[(site, layer)]``."""

    outputs: Tensor
    target: Target
    values: dict = field(default_factory=dict)
    grads: dict = field(default_factory=dict)


def _hooks(sites: Mapping[str, Sequence[int]], store: dict) -> dict:
    hooks = {}
    for site, layers in sites.items():
        wanted = set(int(l) for l in layers)

        def fn(layer: int, t: Tensor, _site: str = site, _wanted: set = wanted) -> None:
            if layer in _wanted:
                store[(_site, layer)] = t
            return None

        hooks[site] = fn
    return hooks


def capture(adapter: ViTAdapter, x: Tensor, target, *, sites: Mapping[str, Sequence[int]],
            grad_of: Sequence[tuple[str, int]] = (), score: str = "auto", rule: AutoScore = LOGIT) -> Capture:
    """One forward pass recording ``sites`` (site -> layers) and, if ``grad_of`` is not empty, the
    gradient of the summed target scores with respect to those captured tensors.

    ``target`` may be anything :meth:`ViTAdapter.resolve_target` accepts (``None``: predicted class).
    Returned values keep no autograd graph.
    """
    store: dict = {}
    hooks = _hooks(sites, store)
    need_grad = len(grad_of) > 0
    with torch.enable_grad() if need_grad else torch.no_grad():
        emb = adapter.embed(x)
        if need_grad and not emb.requires_grad:
            emb = emb.detach().requires_grad_(True)
        out = adapter.head(adapter.run_blocks(emb, hooks=hooks))
        tgt = adapter.resolve_target(target, outputs=out.detach(), batch=x.shape[0])
        grads = {}
        if need_grad:
            s = adapter.score(out, tgt, rule.resolve(score, tgt)).sum()
            inputs = [store[k] for k in grad_of]
            gs = torch.autograd.grad(s, inputs, allow_unused=True)
            grads = {k: (torch.zeros_like(store[k]) if g is None else g.detach()) for k, g in zip(grad_of, gs)}
    values = {k: v.detach() for k, v in store.items()}
    return Capture(outputs=out.detach(), target=tgt, values=values, grads=grads)


def integrated_attention_gradient(adapter: ViTAdapter, x: Tensor, target: Target, *, layer: int, steps: int,
                                  score: str = "auto", clean_grad: Optional[Tensor] = None,
                                  batch_size: Optional[int] = None, progress: Optional[bool] = None,
                                  method: str = "") -> Tensor:
    """Riemann mean of the attention gradient along the straight path from a zero input:

        (1 / steps) * sum_{k=0}^{steps-1} dS(alpha_k x) / dA_layer,  alpha_k = k / (steps - 1)

    (``alpha`` runs over ``linspace(0, 1, steps)``, both ends included, as in the TAM and BT authors'
    code; the baseline is the all-zero input in the model's normalised space). ``clean_grad``, the
    gradient at ``alpha = 1`` when the caller already has it from the clean pass, saves that step.
    All the scaled copies of all images run as batched forward/backward passes.
    """
    if int(steps) < 2:
        raise InputError(f"{method}: steps must be >= 2 (the path from the zero input to the image), got {steps}.")
    B = x.shape[0]
    alphas = torch.linspace(0, 1, int(steps), device=x.device, dtype=x.dtype)
    if clean_grad is not None:
        alphas = alphas[:-1]
    n_a = alphas.shape[0]
    total = B * n_a
    img = torch.arange(B, device=x.device).repeat_interleave(n_a)
    alpha_rows = alphas.repeat(B)
    rep = target.repeat_interleave(n_a)
    T = adapter.num_tokens(x)
    bs = resolve_batch_size(batch_size, adapter, T, total, activations_per_token=12 * 3)
    acc = None
    with progress_bar(total, f"{method} path", progress, unit="input") as bar:
        for sl in batch_slices(total, bs):
            xs = x[img[sl]] * alpha_rows[sl].view(-1, 1, 1, 1)
            cap = capture(adapter, xs, rep.select(sl), sites={"attn": [layer]}, grad_of=[("attn", layer)],
                          score=score)
            g = cap.grads[("attn", layer)].float()
            if acc is None:
                acc = torch.zeros((B,) + tuple(g.shape[1:]), device=x.device, dtype=torch.float32)
            acc.index_add_(0, img[sl], g)
            bar.update(sl.stop - sl.start)
    if clean_grad is not None:
        acc = clean_grad.float() if acc is None else acc + clean_grad.float()
    return acc / int(steps)
