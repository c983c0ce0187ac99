"""LeGrad (Bousselham, Boggust, Chaybouti, Strobelt & Kuehne, "LeGrad: An Explainability Method for
Vision Transformers via Feature Formation Sensitivity", arXiv 2404.03214 / ICCV 2025).

For every selected layer l, with Z^l the tokens after block l and A^l its post-softmax attention
(heads x T x T, T = prefix + patch tokens):

* s^l is the target score read from Z^l by the model's final norm, pooling and head
  (``adapter.head``: CLS token, average pool, both heads of a distilled DeiT averaged as the model
  does, CLIP's final LayerNorm + projection; then ``adapter.score``) -- for CLIP-style models by
  default with the released code's pooling (see ``pooling`` below);
* eq. (5)/(7): E^l = mean over heads h and query rows i of ReLU(d s^l / d A^l)[h, i, :], keeping the
  patch columns;
* eq. (8): E = mean over the selected layers of E^l; min-max normalised and bilinearly upsampled by
  :func:`vitlens.explain`.

Attentional poolers (``pool == "map"``, SigLIP; the paper's "Adaptation to Attentional Pooler"): A^l
is the pooler's attention (heads x latent x N) when the pooler is applied to Z^l (the blocks' own
attention is not used), averaged over heads and latent queries (SigLIP has one latent query).

Implementation: one forward pass. Each selected block is run on its *detached* input, and its
attention probabilities are replaced by a detached leaf, so s^l depends on A^l only through block l;
the sum of all s^l then gives every layer's d s^l / d A^l in ONE backward pass (no per-layer
backward, no ``create_graph``). Several targets per image (classes or prompts) are differentiated
together with batched vector-Jacobian products (``is_grads_batched``), without copying the image.
Parameters and position embeddings are never modified.

Protocol choices (paper vs the released code, ``legrad/wrapper.py`` of WalBouss/LeGrad = package
``legrad-torch`` 1.1; where they differ, the name of the option says which one it is):

* Score: the paper differentiates the target's activation, i.e. the class *logit* for classifiers
  (default ``score="auto"`` -> ``"logit"`` for classes); for text prompts the released code
  differentiates the cosine similarity between the normalised image embedding and the normalised
  text embedding (``"similarity"``, the default for prompts). ``"prob"`` is available.
* Layers (``layers=``, :mod:`vitlens.models.layers`): default ``0.4``, the last 40 % of the blocks
  (``ceil(0.4 L)``; Sec. 4.3.1 finds this the trade-off between the last layer alone and all layers: 5 of
  12 blocks for ViT-B); ``None`` is eq. (8) as written (every block); ``2`` is the released code's
  choice, ``LeWrapper(model, layer_index=-2)``: the last two blocks (``wrapper.py`` ``starting_depth``).
  An int n means the last n blocks, a float in (0, 1] that share of the blocks from the end, a list
  explicit block indices (negatives from the end).
* Pooling (``pooling=``): ``"auto"`` (default) = ``"released"`` for text (CLIP-style) models and
  ``"model"`` for classifiers.
  ``"model"`` reads every layer with the model's own head (CLS token / average pool / both DeiT
  heads / the attentional pooler after the final norm) -- the paper's description.
  ``"released"`` is what the released code does for the published vision-language numbers:
  for CLS-token models (open_clip ``VisionTransformer``, Hugging Face ``CLIPModel``)
  ``compute_legrad_clip`` averages *all* tokens of the layer (class token included,
  ``feat_post_mlp.mean(dim=0)`` over the token axis), then applies the final LayerNorm ``ln_post``
  and the projection ``proj``; the same as ``"mean"`` (every token replaced by the mean, then the
  model's head). For attentional poolers (SigLIP) ``compute_legrad_siglip`` feeds the pooler the
  block output *without* the trunk's final norm (``attn_pool(blk.feat_post_mlp)``), and reads the
  gradient of the pooler's attention, latent query 0, mean over heads.
* Background correction (SigLIP, supplementary; ``compute_legrad_siglip``): the map for the prompt
  ``correction_prompt`` (default ``"a photo of a"``, the released code's ``_init_empty_embedding``)
  is computed with the same layers, min-max normalised, and the target map is set to 0 where it
  exceeds ``correction_threshold`` (0.8) before the final normalisation. On by default only for
  text-capable models with an attentional pooler (SigLIP); needs text prompts. The released code
  differentiates the *sum* of the similarities of all prompts given in one call (one map per image);
  here every prompt gets its own map (identical for a single prompt).
"""
from __future__ import annotations

from typing import Literal, Optional

import torch
from torch import Tensor

from ..batching import batch_slices, resolve_batch_size
from ..batching import progress as progress_bar
from ..errors import InputError, TargetError
from ..explanation import minmax
from ..models.base import ViTAdapter
from ..models.capabilities import Capability
from ..models.layers import LayersLike
from ..models.targets import LOGIT_OR_SIMILARITY, ScoreKind, Target
from .base import MethodKind, MethodResult, register

#: the paper's default (Sec. 4.3.1): the last 40 % of the blocks
PAPER_LAYERS = 0.4
#: the released code's ``LeWrapper(model, layer_index=-2)``: the last two blocks
RELEASED_LAYERS = 2
Pooling = Literal["auto", "model", "released", "mean"]


def resolve_pooling(adapter: ViTAdapter, pooling: Pooling) -> str:
    """``pooling`` -> ``"model"``, ``"mean"`` (token mean, then the model's head) or ``"pooler-prenorm"``
    (attentional pooler fed the blocks' output without the final norm)."""
    if pooling == "auto":
        pooling = "released" if adapter.supports_text else "model"
    if pooling == "released":
        return "pooler-prenorm" if adapter.pool == "map" else "mean"
    if pooling == "mean" and adapter.pool == "map":
        raise InputError("LeGrad pooling='mean' replaces the tokens by their mean before a CLS/average head; "
                         "for an attentional pooler use 'model' or 'released'.")
    return pooling


def _flatten_targets(target, batch: int) -> tuple[object, int]:
    """Per-image target lists -> (flat image-major list, targets per image K).

    A list of lists (one list per image, equal lengths) or, for a single image, a plain list of
    several targets asks for K maps per image; anything else is one target per image (K = 1)."""
    if isinstance(target, Tensor) and target.dim() == 2:
        target = target.tolist()
    if isinstance(target, (list, tuple)) and target and all(isinstance(t, (list, tuple)) for t in target):
        if len(target) != batch:
            raise TargetError(f"got {len(target)} target lists for {batch} images; give one list per image.")
        k = len(target[0])
        if k == 0 or any(len(t) != k for t in target):
            raise TargetError("every image needs the same (non-zero) number of targets.")
        return [t for per in target for t in per], k
    if batch == 1 and isinstance(target, (list, tuple)) and len(target) > 1:
        return list(target), len(target)
    if batch == 1 and isinstance(target, Tensor) and target.numel() > 1:
        return target.reshape(-1).tolist(), int(target.numel())
    return target, 1


def _tile(t: Target, n: int) -> Target:
    """Target rows repeated as whole blocks: [t, t, ..., t] (n times)."""
    return t.select(list(range(len(t))) * n)


def _layer_scores(adapter: ViTAdapter, outs: Tensor, tgt: Target, k: int, kind: str) -> Tensor:
    """Scores (S, b, K) of the K targets per image from head outputs (S, b, E); ``tgt`` has b*K rows."""
    S, b, E = outs.shape
    rows = outs[:, :, None].expand(S, b, k, E).reshape(S * b * k, E)
    return adapter.score(rows, _tile(tgt, S), kind).reshape(S, b, k)


def _vjp(scores: Tensor, leaves: list[Tensor]) -> list[Tensor]:
    """d(sum over layers and images of scores[..., k]) / d leaf for every target column k, in one
    backward pass: returns per leaf (K, *leaf.shape)."""
    K = scores.shape[-1]
    if K == 1:
        grads = torch.autograd.grad(scores.sum(), leaves)
        return [g[None] for g in grads]
    eye = torch.eye(K, dtype=scores.dtype, device=scores.device)
    go = eye.reshape(K, *([1] * (scores.dim() - 1)), K).expand(K, *scores.shape).contiguous()
    return list(torch.autograd.grad(scores, leaves, grad_outputs=go, is_grads_batched=True))


def _pooled_head(adapter: ViTAdapter, tokens: Tensor, pooling: str) -> Tensor:
    if pooling == "mean":  # authors' CLIP code: every token replaced by the mean of all tokens
        tokens = tokens.mean(1, keepdim=True).expand_as(tokens)
    return adapter.head(tokens)


def _chunk_self_attention(adapter: ViTAdapter, x: Tensor, sel: list[int], pooling: str):
    """One forward pass; returns clean outputs, the attention leaves of the selected blocks and their
    head outputs (S, b, E) (graph: leaf A^l -> block l -> head only)."""
    leaves: list[Tensor] = []

    def grab(layer: int, a: Tensor) -> Tensor:
        leaf = a.detach().requires_grad_(True)
        leaves.append(leaf)
        return leaf

    hooks = {"attn": grab}
    selected = set(sel)
    feats = []
    with torch.no_grad():
        t = adapter.embed(x)
    for layer in range(adapter.num_blocks):
        if layer in selected:
            with torch.enable_grad():
                z = adapter.run_block(layer, t.detach(), hooks)
            feats.append(z)
            t = z.detach()
        else:
            with torch.no_grad():
                t = adapter.run_block(layer, t)
    with torch.no_grad():
        outputs = adapter.head(t)
    with torch.enable_grad():
        outs = _pooled_head(adapter, torch.cat(feats, 0), pooling).reshape(len(sel), x.shape[0], -1)
    return outputs, leaves, outs


def _chunk_pooler(adapter: ViTAdapter, x: Tensor, sel: list[int], final_norm: bool = True):
    """Attentional pooler variant: the blocks run once without gradients; the pooler is applied to
    every selected layer's tokens at once with its attention as the (single) leaf."""
    with torch.no_grad():
        tr = adapter.trace(x, tokens=True)
        feats = torch.cat([tr.tokens[l] for l in sel], 0)
    leaf: list[Tensor] = []

    def grab(a: Tensor) -> Tensor:
        leaf.append(a.detach().requires_grad_(True))
        return leaf[0]

    with torch.enable_grad():
        outs = adapter.head_with_pool_attention(feats, grab, final_norm=final_norm).reshape(len(sel), x.shape[0], -1)
    return tr.outputs, leaf, outs


def _relevance(grads: list[Tensor], pooler: bool, S: int, b: int, first_col: int) -> Tensor:
    """Eq. (5)/(7)-(8): ReLU, mean over heads and query rows, patch columns, mean over layers -> (K, b, N)."""
    if pooler:
        g = grads[0]  # (K, S*b, H, latent, N_in)
        e = g.clamp_min(0).mean(dim=(-3, -2)).float()
        e = e.reshape(g.shape[0], S, b, -1)[..., first_col:]
        return e.mean(1)
    acc = None
    for g in grads:  # (K, b, H, T, T) per layer
        e = g.clamp_min(0).mean(dim=(-3, -2)).float()[..., first_col:]
        acc = e if acc is None else acc + e
    return acc / len(grads)


@register("legrad", kind=MethodKind.GRADIENT, token_level=True, needs=(Capability.BLOCKS,),
          auto_score=LOGIT_OR_SIMILARITY,
          old_values={"layers": {"paper": PAPER_LAYERS, "all": None, "released": RELEASED_LAYERS}},
          description="LeGrad: layer-wise gradients w.r.t. attention maps (Bousselham et al. 2024)")
def legrad(adapter: ViTAdapter, x: Tensor, target=None, *, seed: Optional[int] = 0,
           batch_size: Optional[int] = None, progress: Optional[bool] = None, layers: LayersLike = PAPER_LAYERS,
           score: ScoreKind = "auto", pooling: Pooling = "auto", correction: Optional[bool] = None,
           correction_prompt: str = "a photo of a", correction_threshold: float = 0.8) -> MethodResult:
    """LeGrad saliency (deterministic; ``seed`` is unused).

    Args:
        target: as in :func:`vitlens.explain`; additionally a list of lists (one list of K targets
            per image) or, for a single image, a list of K targets gives K maps per image
            (image-major), computed from one forward pass with batched gradients.
        layers: the blocks whose attention is differentiated (:mod:`vitlens.models.layers`): ``0.4``
            (default: the last 40 % of the blocks, Sec. 4.3.1), ``None`` (every block: eq. 8 as written),
            ``2`` (the last 2 blocks, the released code's ``layer_index=-2``), a count n (the last n), a
            share of the blocks from the end, or explicit block indices.
        score: ``"auto"`` (logit for classes, cosine similarity for prompts), ``"logit"``, ``"prob"``,
            ``"similarity"``.
        pooling: ``"auto"`` (``"released"`` for text models, ``"model"`` for classifiers), ``"model"``
            (the model's own head, the paper), ``"released"`` (the released code: CLS models average
            all tokens before ``ln_post`` + projection; attentional poolers get the block output
            without the final norm) or ``"mean"`` (token mean, then the model's head).
        correction: SigLIP background correction (None: on for text models with an attentional pooler).
        correction_prompt, correction_threshold: its prompt and threshold.
        batch_size: images per forward/backward pass (automatic when None).

    Returns:
        :class:`MethodResult` with ``token_maps`` (B*K, gh, gw) (K targets per image, image-major);
        ``extras``: the blocks, score kind, pooling, correction and ``targets_per_image``.

    Example::

        >>> exp = vitlens.explain(model, x, "legrad", layers=None)           # eq. (8): every block
        >>> exp = vitlens.explain(clip, x, "legrad", target=[["a dog", "a cat"]])  # two prompts, one image
    """
    pool_mode = resolve_pooling(adapter, pooling)
    pooler = adapter.pool == "map"
    if pooler:
        adapter.require("an explicit attentional pooler (head_with_pool_attention)",
                        hasattr(adapter, "head_with_pool_attention"), "legrad")
    if correction is None:
        correction = pooler and adapter.supports_text
    if correction:
        adapter.require("text prompts (for the background correction)", adapter.supports_text, "legrad")
        if not 0.0 <= correction_threshold <= 1.0:
            raise InputError(f"correction_threshold must lie in [0, 1], got {correction_threshold}.")
    sel = adapter.select_layers(layers, "legrad")
    B = x.shape[0]
    flat, K = _flatten_targets(target, B)
    tgt_all = None if flat is None else adapter.resolve_target(flat, batch=B * K)
    empty = adapter.resolve_target(correction_prompt, batch=1) if correction else None
    first_col = adapter.pool_prefix_columns if pooler else adapter.num_prefix_tokens
    T = adapter.num_tokens(x)
    bs = resolve_batch_size(batch_size, adapter, T * len(sel), B)

    maps, outs_all, tgts, kind = [], [], [], None
    with progress_bar(B, "LeGrad", progress, unit="image") as bar:
        for sl in batch_slices(B, bs):
            xb = x[sl]
            b = xb.shape[0]
            if pooler:
                outputs, leaves, feats = _chunk_pooler(adapter, xb, sel, final_norm=pool_mode != "pooler-prenorm")
            else:
                outputs, leaves, feats = _chunk_self_attention(adapter, xb, sel, pool_mode)
            if tgt_all is None:
                tb = adapter.resolve_target(None, outputs=outputs, batch=b)
            else:
                tb = tgt_all.select(slice(sl.start * K, sl.stop * K))
            kind = LOGIT_OR_SIMILARITY.resolve(score, tb)
            with torch.enable_grad():
                s = _layer_scores(adapter, feats, tb, K, kind)
                if correction:
                    s = torch.cat([s, _layer_scores(adapter, feats, _tile(empty, b), 1, "similarity")], -1)
                grads = _vjp(s, leaves)
            rel = _relevance(grads, pooler, len(sel), b, first_col)  # (K', b, N)
            del grads, leaves, feats
            if correction:
                bg = minmax(rel[-1]) > correction_threshold  # (b, N)
                rel = rel[:-1].masked_fill(bg[None], 0.0)
            maps.append(rel.transpose(0, 1).reshape(b * K, -1))
            outs_all.append(outputs.repeat_interleave(K, 0) if K > 1 else outputs)
            tgts.append(tb)
            bar.update(b)
    gh, gw = adapter.grid_size(x)
    tgt = Target.cat(tgts)
    extras = {"layers": sel, "score": kind, "pooling": pool_mode if not pooler or pool_mode != "model" else "pooler-attention",
              "correction": bool(correction), "targets_per_image": K}
    return MethodResult(target=tgt, token_maps=torch.cat(maps, 0).reshape(B * K, gh, gw),
                        outputs=torch.cat(outs_all, 0).detach(), extras=extras)
