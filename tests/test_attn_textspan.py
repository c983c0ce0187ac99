"""TextSpan (Gandelsman et al. 2024) against the spatial decomposition written from the paper with
explicit loops over layers, heads and tokens, using the models' own weights (open_clip with text
prompts, a timm classifier with class logits)."""
from __future__ import annotations

import pytest
import torch
from test_attention_methods import CLASSES, PROMPTS, close, grid, make, ours, x_batch

import vitlens
from vitlens.errors import InputError, UnsupportedModelError


def _block_parts(name, a, l):
    """(norm1, W_v, b_v, W_O) of block l from the library's own modules."""
    if name == "open_clip":
        blk = a.module.visual.transformer.resblocks[l]
        D = blk.attn.embed_dim
        return blk.ln_1, blk.attn.in_proj_weight[2 * D:], blk.attn.in_proj_bias[2 * D:], blk.attn.out_proj.weight
    blk = a.module.blocks[l]
    D = blk.attn.proj.weight.shape[0]
    return blk.norm1, blk.attn.qkv.weight[2 * D:], blk.attn.qkv.bias[2 * D:], blk.attn.proj.weight


def _reference(name, a, x1, i, n_layers):
    with torch.no_grad():
        tr = a.trace(x1, tokens=True, attn=True)
        emb = a.embed(x1)
        L, H = a.num_blocks, a.num_heads
        if name == "open_clip":
            v = a.module.visual
            norm, P = v.ln_post, v.proj  # y = ln_post(x_cls) @ proj
            t = a.encode_text([PROMPTS[i]])[0]
            y = a.module.encode_image(x1)[0]
        else:
            m = a.module
            norm, P = m.norm, m.head.weight.T  # logits = norm(x_cls) @ W^T + b
            t = torch.zeros(P.shape[1])
            t[CLASSES[i]] = 1.0
            y = None
        xf = tr.tokens[-1][0, 0]
        sigma = torch.sqrt(xf.var(unbiased=False) + norm.eps)
        T = emb.shape[1]
        E = torch.zeros(T)
        for l in range(L - n_layers, L):
            n1, Wv, bv, Wo = _block_parts(name, a, l)
            z = (emb if l == 0 else tr.tokens[l - 1])[0]
            vals = n1(z) @ Wv.T + bv  # (T, D)
            hd = vals.shape[-1] // H
            A = tr.attn[l][0]
            for h in range(H):
                sl = slice(h * hd, (h + 1) * hd)
                for j in range(T):
                    c = A[h, 0, j] * (vals[j, sl] @ Wo[:, sl].T)  # W_O^h a v_j^h
                    lin = (norm.weight * (c - c.mean()) / sigma) @ P
                    E[j] += (lin * t).sum()
        if y is not None:
            E = E / y.norm()
    return E


@pytest.mark.parametrize("name,n_layers", [("open_clip", None), ("open_clip", 1), ("timm_registers", None),
                                           ("timm_vit", 1)])
def test_textspan_matches_decomposition(name, n_layers):
    a = make(name)
    x = x_batch()
    tg = PROMPTS if name == "open_clip" else CLASSES
    got = ours(a, x, "textspan", tg, layers=n_layers)
    for i in range(2):
        ref = _reference(name, a, x[i:i + 1], i, a.num_blocks if n_layers is None else n_layers)
        close(got[i], grid(a, ref), rtol=1e-3)


def test_textspan_class_targets_on_clip_use_the_class_prompt():
    a = make("open_clip")
    a.set_classes(["dog", "red car", "tree"], template="a photo of a {}")
    x = x_batch()
    by_class = ours(a, x, "textspan", [0, 1], layers=None)
    by_prompt = ours(a, x, "textspan", ["a photo of a dog", "a photo of a red car"], layers=None)
    close(by_class, by_prompt, rtol=1e-4)  # text features from batches of 3 vs 2 prompts: float32 order differs
    contrasted = ours(a, x, "textspan", [0, 1], layers=None, contrast="class_mean")
    assert not torch.allclose(contrasted, by_class)


def test_textspan_errors():
    with pytest.raises(UnsupportedModelError, match="CLS"):
        vitlens.explain(make("timm_avgpool"), x_batch(), "textspan", target=1)
    with pytest.raises(InputError, match="last 3 blocks but the model has"):
        vitlens.explain(make("open_clip"), x_batch(), "textspan", target="a dog", layers=3)
    with pytest.raises(InputError, match="'n_layers' of method 'textspan' is now 'layers'"):
        vitlens.explain(make("open_clip"), x_batch(), "textspan", target="a dog", n_layers=1)
