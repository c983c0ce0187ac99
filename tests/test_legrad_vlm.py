"""LeGrad on the vision-language families of issue 14 against slow references that follow the released
code (WalBouss/LeGrad ``legrad/wrapper.py``) as read: ``compute_legrad_clip`` (all tokens averaged,
then ``ln_post`` and the projection; gradient of the cosine w.r.t. each selected block's attention;
ReLU, mean over heads and query rows, patch columns; summed over layers) and
``compute_legrad_siglip`` (the pooler fed the block output without the final norm; gradient w.r.t.
the pooler's attention, ReLU, mean over heads, latent query 0; background correction with the
prompt "a photo of a", min-max > 0.8 set to 0). One ``autograd.grad`` per layer and image, library
modules for the blocks, the pooler and the text tower. vitlens averages the layers (the code sums):
the references are divided by the number of layers."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import vitlens

from conftest import TINY_FACTORIES, VLM_FACTORIES, toy_tokenizer, wrap_tiny

PROMPTS = ["a photo of a dog", "a red car"]


def _text(name, m, prompt):
    if name in ("open_clip", "open_clip_siglip"):
        import open_clip

        t = m.encode_text(open_clip.tokenize([prompt]))
    else:
        out = m.get_text_features(input_ids=toy_tokenizer([prompt]))
        t = out if isinstance(out, torch.Tensor) else out.pooler_output
    return F.normalize(t.float(), dim=-1)[0]


def slow_released_clip(name, m, x, prompts, layers):
    """compute_legrad_clip, one image and one layer at a time."""
    a = wrap_tiny(name, m)  # its canonical blocks = the library's (tests/test_adapters*.py)
    maps = []
    for b in range(x.shape[0]):
        attn, toks = {}, {}
        a.forward(x[b:b + 1].clone().requires_grad_(True),
                  hooks={"attn": lambda l, A: attn.__setitem__(l, A), "output": lambda l, Z: toks.__setitem__(l, Z)})
        acc = 0
        for l in layers:
            z = toks[l].mean(1)  # every token, class token included
            if name == "open_clip":
                feat = m.visual.ln_post(z) @ m.visual.proj
            else:
                feat = m.visual_projection(m.vision_model.post_layernorm(z))
            sim = (F.normalize(feat, dim=-1)[0] * _text(name, m, prompts[b])).sum()
            (g,) = torch.autograd.grad(sim, attn[l], retain_graph=True)
            acc = acc + g[0].clamp(min=0).mean(0).mean(0)[1:]
        maps.append(acc)
    return torch.stack(maps).reshape(-1, 4, 4)


def _pooler_open_clip(m, z):
    """timm AttentionPoolLatent of the SigLIP trunk written out; returns (probs, pooled)."""
    p = m.visual.trunk.attn_pool
    B, N, C = z.shape
    H, hd = p.num_heads, p.head_dim
    q = p.q(p.latent).reshape(1, p.latent_len, H, hd).transpose(1, 2)
    kv = p.kv(z).reshape(B, N, 2, H, hd)
    k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
    probs = ((q * hd ** -0.5) @ k.transpose(-2, -1)).softmax(-1)
    y = p.proj((probs @ v).transpose(1, 2).reshape(B, p.latent_len, C))
    y = y + p.mlp(p.norm(y))
    return probs, m.visual.head(y[:, 0])


def _pooler_hf(m, z):
    """Hugging Face SiglipMultiheadAttentionPoolingHead written out from its nn.MultiheadAttention weights."""
    head = m.vision_model.head
    mha = head.attention
    B, N, D = z.shape
    H = mha.num_heads
    hd = D // H
    W, bias = mha.in_proj_weight, mha.in_proj_bias
    q = (head.probe @ W[:D].T + bias[:D]).reshape(1, 1, H, hd).transpose(1, 2)
    k = (z @ W[D:2 * D].T + bias[D:2 * D]).reshape(B, N, H, hd).transpose(1, 2)
    v = (z @ W[2 * D:].T + bias[2 * D:]).reshape(B, N, H, hd).transpose(1, 2)
    probs = ((q @ k.transpose(-2, -1)) / hd ** 0.5).softmax(-1)
    y = mha.out_proj((probs @ v).transpose(1, 2).reshape(B, 1, D))
    y = y + head.mlp(head.layernorm(y))
    return probs, y[:, 0]


def _blocks_out(name, m, x1):
    if name == "open_clip_siglip":
        t = m.visual.trunk
        h = t.norm_pre(t._pos_embed(t.patch_embed(x1)))
        out = []
        for blk in t.blocks:
            h = blk(h)
            out.append(h)
        return out
    vm = m.vision_model
    h = vm.embeddings(x1)
    out = []
    for layer in vm.encoder.layers:
        h = layer(h, attention_mask=None)
        h = h[0] if isinstance(h, tuple) else h
        out.append(h)
    return out


def slow_released_siglip(name, m, x, prompts, layers, correction=True, norm=False):
    """compute_legrad_siglip (``norm=True``: the pooler fed the final-normed tokens, the model's own head)."""
    pool = _pooler_open_clip if name == "open_clip_siglip" else _pooler_hf
    final_norm = m.visual.trunk.norm if name == "open_clip_siglip" else m.vision_model.post_layernorm
    maps = []
    for b in range(x.shape[0]):
        feats = _blocks_out(name, m, x[b:b + 1])
        acc, acc_bg = 0, 0
        for l in layers:
            z = final_norm(feats[l]) if norm else feats[l]
            probs, pooled = pool(m, z)
            pooled = F.normalize(pooled.float(), dim=-1)[0]
            (g,) = torch.autograd.grad((pooled * _text(name, m, prompts[b])).sum(), probs, retain_graph=True)
            acc = acc + g[0].clamp(min=0).mean(0)[0]
            if correction:
                (g0,) = torch.autograd.grad((pooled * _text(name, m, "a photo of a")).sum(), probs, retain_graph=True)
                acc_bg = acc_bg + g0[0].clamp(min=0).mean(0)[0]
        if correction:
            bg = (acc_bg - acc_bg.min()) / (acc_bg.max() - acc_bg.min())
            acc = acc.masked_fill(bg > 0.8, 0.0)
        maps.append(acc)
    return torch.stack(maps).reshape(-1, 4, 4)


def _close(fast, slow):
    assert slow.abs().max() > 0
    torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-5 * float(slow.abs().max()))


@pytest.mark.parametrize("name", ["open_clip", "hf_clip"])
@pytest.mark.parametrize("layers,expect", [(0.4, [1]), (2, [0, 1])])
def test_clip_default_pooling_is_the_released_token_mean(name, layers, expect, images):
    m = TINY_FACTORIES[name]() if name == "open_clip" else VLM_FACTORIES[name]()
    a = wrap_tiny(name, m)
    exp = vitlens.explain(a, images, "legrad", target=PROMPTS, layers=layers, normalise=False)
    assert exp.extras["layers"] == expect and exp.extras["pooling"] == "mean"
    _close(exp.token_maps, slow_released_clip(name, m, images, PROMPTS, expect) / len(expect))


@pytest.mark.parametrize("name", ["open_clip_siglip", "hf_siglip"])
def test_siglip_default_is_the_released_pooler_input_with_correction(name, images):
    m = VLM_FACTORIES[name]()
    a = wrap_tiny(name, m)
    exp = vitlens.explain(a, images, "legrad", target=PROMPTS, layers=None, normalise=False)
    assert exp.extras["pooling"] == "pooler-prenorm" and exp.extras["correction"] is True
    ref = slow_released_siglip(name, m, images, PROMPTS, [0, 1])
    _close(exp.token_maps, ref / 2)
    # the model's own head (final norm before the pooler) is the option, and it differs
    own = vitlens.explain(a, images, "legrad", target=PROMPTS, layers=None, pooling="model", correction=False,
                          normalise=False)
    _close(own.token_maps, slow_released_siglip(name, m, images, PROMPTS, [0, 1], correction=False, norm=True) / 2)
    assert not torch.allclose(own.token_maps, exp.token_maps)


def test_correction_prompt_is_the_released_one():
    from vitlens.methods import get_method

    d = get_method("legrad").defaults
    assert d["correction_prompt"] == "a photo of a" and d["layers"] == 0.4 and d["pooling"] == "auto"


def test_pooling_errors(images):
    from vitlens.errors import InputError

    a = wrap_tiny("open_clip_siglip")
    with pytest.raises(InputError, match="attentional pooler"):
        vitlens.explain(a, images, "legrad", target="a dog", pooling="mean")


# ---------------------------------------------------------------------------- LeGrad supp. eq. 9 / eq. 10 variants


def _ref_site_grad(a, x1, prompt, layer, site):
    """(value, d similarity / d value) at one hook site, one image, through a leaf replacement."""
    store = {}

    def hook(l, t):
        if l == layer:
            store["v"] = t.detach().clone().requires_grad_(True)
            return store["v"]
        return None

    hooks = {site: hook}
    if site != "attn":
        hooks["attn"] = lambda l, t: None
    with torch.enable_grad():
        out = a.forward(x1, hooks=hooks)
        s = a.score(out, a.resolve_target(prompt, batch=1), "logit")[0]
        (g,) = torch.autograd.grad(s, store["v"])
    return store["v"].detach()[0], g[0]


@pytest.mark.parametrize("name", ["open_clip", "hf_deit_distilled"])
def test_attention_cam_legrad_eq10(name, images):
    a = wrap_tiny(name)
    tg = "a photo of a dog" if name == "open_clip" else 3
    got = vitlens.explain(a, images, "attention_cam", target=tg, variant="legrad", normalise=False).token_maps
    P = a.num_prefix_tokens
    for i in range(2):
        A, G = _ref_site_grad(a, images[i:i + 1], tg, a.num_blocks - 1, "attn")  # (H, T, T)
        cam = 0
        for h in range(A.shape[0]):  # head sum of (gradient mean over all T x T positions) * CLS row
            cam = cam + G[h].sum() / G[h].numel() * A[h, 0, P:]
        ref = cam.reshape(4, 4)
        assert (ref < 0).any() or (ref > 0).all()  # no ReLU: negative values survive
        _close(got[i], ref)


@pytest.mark.parametrize("name", ["open_clip", "timm_registers"])
def test_gradcam_legrad_eq9(name, images):
    m = TINY_FACTORIES[name]()
    a = wrap_tiny(name, m)
    tg = "a photo of a dog" if name == "open_clip" else 3
    got = vitlens.explain(a, images, "gradcam", target=tg, variant="legrad", normalise=False).token_maps
    P = a.num_prefix_tokens
    for i in range(2):
        Z, G = _ref_site_grad(a, images[i:i + 1], tg, a.num_blocks - 1, "input")  # (T, D)
        alpha = G.sum(0) / G.shape[0]  # every token, prefix included
        cam = torch.stack([torch.relu((alpha * Z[t]).sum() / Z.shape[1]) for t in range(P, Z.shape[0])])
        if cam.max() == 0:
            assert got[i].abs().max() == 0
            continue
        _close(got[i], cam.reshape(4, 4))
    default = vitlens.explain(a, images, "gradcam", target=tg, normalise=False).token_maps
    assert not torch.allclose(default, got)
