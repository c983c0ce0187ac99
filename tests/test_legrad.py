"""LeGrad against a slow implementation of the paper's equations written here: one
``torch.autograd.grad`` per layer (and per image), on the full, undetached graph, with each family's
*library* head (final norm + pooling + classifier / projection) and the score written out."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import vitlens
from vitlens.errors import InputError, TargetError, UnsupportedModelError
from vitlens.models.layers import take_indices as select_layers

from conftest import IMG, TINY_FACTORIES, tiny_timm
from tiny_models import tiny_siglip_like


def _library_head(name, module, z):
    """Model output from tokens z, written with each library's own modules."""
    if name.startswith("timm"):
        return module.forward_head(module.norm(z))
    if name == "torchvision":
        return module.heads(module.encoder.ln(z)[:, 0])
    if name == "hf":
        return module.classifier(module.vit.layernorm(z)[:, 0])
    if name == "open_clip":
        v = module.visual
        return v.ln_post(z[:, 0]) @ v.proj
    raise AssertionError(name)


def _text(module, prompt):
    import open_clip

    return F.normalize(module.encode_text(open_clip.tokenize([prompt])).float(), dim=-1)[0]


def _score(y, target, kind, module=None):
    """s = logit / softmax probability of class ``target``, or cosine similarity with a prompt."""
    if isinstance(target, str):
        return (F.normalize(y.float(), dim=-1) * _text(module, target)).sum(-1)
    if kind == "prob":
        return y.softmax(-1)[target]
    return y[target]


def slow_legrad(name, module, x, targets, layers, kind="logit", pooling="model"):
    """Eq. (5)/(7)-(8) for one image at a time and one layer at a time (one autograd.grad each)."""
    a = vitlens.wrap_model(module)
    P = a.num_prefix_tokens
    maps = []
    for b in range(x.shape[0]):
        attn, toks = {}, {}
        hooks = {"attn": lambda l, A: attn.__setitem__(l, A), "output": lambda l, Z: toks.__setitem__(l, Z)}
        a.forward(x[b:b + 1].clone().requires_grad_(True), hooks=hooks)
        per_layer = []
        for l in layers:
            z = toks[l]
            if pooling == "mean":
                z = z.mean(1, keepdim=True)
            s = _score(_library_head(name, module, z)[0], targets[b], kind, module)
            (g,) = torch.autograd.grad(s, attn[l], retain_graph=True)  # (1, H, T, T)
            per_layer.append(g[0].clamp_min(0).mean(0).mean(0)[P:])  # heads, query rows; patch columns
        maps.append(torch.stack(per_layer).mean(0))
    gh, gw = a.grid_size(x)
    return torch.stack(maps).reshape(-1, gh, gw)


def _pooler_probs_and_out(m, z):
    """SigLIP-style pooler (timm AttentionPoolLatent) written out, with explicit attention."""
    p = m.attn_pool
    x = m.norm(z)
    B, N, C = x.shape
    H, hd = p.num_heads, p.head_dim
    q = p.q(p.latent).reshape(1, p.latent_len, H, hd).transpose(1, 2)
    kv = p.kv(x).reshape(B, N, 2, H, hd)
    k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
    probs = ((q * hd ** -0.5) @ k.transpose(-2, -1)).softmax(-1)  # (B, H, latent, N)
    y = (probs @ v).transpose(1, 2).reshape(B, p.latent_len, C)
    y = p.proj(y)
    y = y + p.mlp(p.norm(y))
    return probs, m.head(m.fc_norm(y[:, 0]))


def slow_legrad_pooler(m, x, targets, layers):
    maps = []
    for b in range(x.shape[0]):
        t = m.norm_pre(m._pos_embed(m.patch_embed(x[b:b + 1])))
        toks = []
        for blk in m.blocks:
            t = blk(t)
            toks.append(t)
        per_layer = []
        for l in layers:
            probs, y = _pooler_probs_and_out(m, toks[l])
            (g,) = torch.autograd.grad(y[0, targets[b]], probs)
            per_layer.append(g[0].clamp_min(0).mean(0).mean(0))
        maps.append(torch.stack(per_layer).mean(0))
    g = IMG // 16
    return torch.stack(maps).reshape(-1, g, g)


def _module(name):
    module = TINY_FACTORIES[name]()
    if name == "torchvision":  # torchvision zero-initialises its classifier: give it weights
        with torch.no_grad():
            module.heads.head.weight.normal_(generator=torch.Generator().manual_seed(0))
    return module


def _close(fast, slow):
    assert slow.abs().max() > 0
    torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-5 * float(slow.abs().max()))


def _targets(name, n):
    return ["a photo of a dog", "a red car"][:n] if name == "open_clip" else [3, 7][:n]


@pytest.mark.parametrize("name", sorted(TINY_FACTORIES))
def test_matches_slow_reference_every_family(name, images):
    module = _module(name)
    tg = _targets(name, 2)
    exp = vitlens.explain(module, images, "legrad", target=tg, layers=None, pooling="model", normalise=False)
    slow = slow_legrad(name, module, images, tg, layers=[0, 1],
                       kind="similarity" if name == "open_clip" else "logit")
    _close(exp.token_maps, slow)
    assert not torch.allclose(exp.token_maps[0], exp.token_maps[1])


@pytest.mark.parametrize("layers,expect", [(1, [1]), ([0], [0]), ([-1, 0], [0, 1])])
def test_layer_selection_matches_reference(layers, expect, images):
    module = tiny_timm("vit", reg_tokens=2)
    exp = vitlens.explain(module, images, "legrad", target=[1, 2], layers=layers, normalise=False)
    _close(exp.token_maps, slow_legrad("timm_registers", module, images, [1, 2], layers=expect))
    assert exp.extras["layers"] == expect


def test_prob_score_and_mean_pooling_match_reference(images):
    module = TINY_FACTORIES["timm_vit"]()
    exp = vitlens.explain(module, images, "legrad", target=[4, 5], score="prob", layers=None, normalise=False)
    _close(exp.token_maps, slow_legrad("timm_vit", module, images, [4, 5], [0, 1], kind="prob"))
    clip = TINY_FACTORIES["open_clip"]()
    tg = ["a dog", "a cat"]
    exp = vitlens.explain(clip, images, "legrad", target=tg, pooling="mean", layers=None, normalise=False)
    _close(exp.token_maps, slow_legrad("open_clip", clip, images, tg, [0, 1], "similarity", pooling="mean"))


def test_pooler_head_matches_library(images):
    m = tiny_siglip_like()
    a = vitlens.wrap_model(m)
    seen = []
    with torch.no_grad():
        out = a.head_with_pool_attention(a.run_blocks(a.embed(images)), lambda p: seen.append(p))
        ref = m(images)
    _close(out, ref)  # our pooling head vs the library's: same maths, other float32 order
    assert seen[0].shape == (2, a.num_heads, 1, 16)
    torch.testing.assert_close(seen[0].sum(-1), torch.ones(2, a.num_heads, 1))


@pytest.mark.parametrize("layers,expect", [(0.4, [1]), (None, [0, 1]), (1, [1])])
def test_attentional_pooler_matches_reference(layers, expect, images):
    m = tiny_siglip_like()
    exp = vitlens.explain(m, images, "legrad", target=[2, 9], layers=layers, normalise=False)
    _close(exp.token_maps, slow_legrad_pooler(m, images, [2, 9], expect))
    assert exp.extras["pooling"] == "pooler-attention" and exp.extras["correction"] is False


@pytest.mark.parametrize("name", ["timm_deit_distilled", "open_clip", "siglip_like"])
def test_several_targets_per_image_equal_single_runs(name, images):
    module = tiny_siglip_like() if name == "siglip_like" else TINY_FACTORIES[name]()
    per_image = ([["a dog", "a cat", "a car"], ["a tree", "a dog", "a boat"]] if name == "open_clip"
                 else [[0, 3, 5], [9, 1, 1]])
    many = vitlens.explain(module, images, "legrad", target=per_image, normalise=False)
    assert many.token_maps.shape == (6, 4, 4) and many.extras["targets_per_image"] == 3
    for k in range(3):
        one = vitlens.explain(module, images, "legrad", target=[per_image[0][k], per_image[1][k]], normalise=False)
        _close(many.token_maps[k], one.token_maps[0])
        _close(many.token_maps[3 + k], one.token_maps[1])
    single = vitlens.explain(module, images[:1], "legrad", target=per_image[0], normalise=False)
    _close(single.token_maps, many.token_maps[:3])


def test_background_correction(images):
    clip = TINY_FACTORIES["open_clip"]()
    tg = ["a dog", "a cat"]
    exp = vitlens.explain(clip, images, "legrad", target=tg, correction=True, layers=None, pooling="model",
                          normalise=False)
    raw = slow_legrad("open_clip", clip, images, tg, [0, 1], "similarity")
    bg = slow_legrad("open_clip", clip, images, ["a photo of a"] * 2, [0, 1], "similarity")  # released prompt
    lo = bg.amin((1, 2), keepdim=True)
    suppress = (bg - lo) / (bg.amax((1, 2), keepdim=True) - lo) > 0.8
    assert suppress.any()
    _close(exp.token_maps, raw.masked_fill(suppress, 0.0))
    plain = vitlens.explain(clip, images, "legrad", target=tg, layers=None, pooling="model",
                            normalise=False)  # off by default for CLIP
    _close(plain.token_maps, raw)
    with pytest.raises(UnsupportedModelError, match="text prompts"):
        vitlens.explain(tiny_timm("vit"), images, "legrad", target=1, correction=True)


def test_no_side_effects_and_works_under_no_grad(images):
    m = tiny_timm("vit")
    before = {k: v.clone() for k, v in m.state_dict().items()}
    ref = vitlens.explain(m, images, "legrad", target=[1, 2], normalise=False).token_maps
    with torch.no_grad():
        again = vitlens.explain(m, images, "legrad", target=[1, 2], normalise=False).token_maps
    torch.testing.assert_close(again, ref, rtol=0, atol=0)
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in m.parameters())
    # target=None explains the predicted class, also when the images run one at a time
    pred = m(images).argmax(-1)
    auto = vitlens.explain(m, images, "legrad", normalise=False, batch_size=1)
    assert auto.targets.tolist() == pred.tolist()
    _close(auto.token_maps, vitlens.explain(m, images, "legrad", target=pred.tolist(), normalise=False).token_maps)


def test_select_layers_and_errors(images):
    assert select_layers(None, 5) == [0, 1, 2, 3, 4]
    assert select_layers(0.4, 5) == [3, 4]  # the paper's default, last 40 %: ceil(0.4 * 5) = 2
    assert select_layers(0.4, 12) == [7, 8, 9, 10, 11] and select_layers(0.4, 24) == list(range(14, 24))
    assert select_layers(2, 12) == [10, 11] and select_layers(1, 1) == [0]  # the released code's last 2
    assert select_layers(2, 5) == [3, 4]
    assert select_layers(0.4, 5) == [3, 4]
    assert select_layers(0.4, 12) == [7, 8, 9, 10, 11]
    assert select_layers(0.3, 10) == [7, 8, 9]
    assert select_layers([4, -1, 0], 5) == [0, 4]
    for bad in (0, 6, [5], [], 1.5, True, "last"):
        with pytest.raises(InputError):
            select_layers(bad, 5)
    for old, new in (("paper", "0.4"), ("all", "None"), ("released", "2")):  # the old names say what replaced them
        with pytest.raises(InputError, match=f"layers='{old}' of method 'legrad' is now layers={new}"):
            vitlens.explain(tiny_timm("vit"), images, "legrad", target=1, layers=old)
    m = tiny_timm("vit")
    with pytest.raises(InputError, match="score"):
        vitlens.explain(m, images, "legrad", target=1, score="entropy")
    with pytest.raises(InputError, match="pooling"):
        vitlens.explain(m, images, "legrad", target=1, pooling="max")
    with pytest.raises(TargetError):
        vitlens.explain(m, images, "legrad", target=[[1, 2], [3]])
    with pytest.raises(TargetError):
        vitlens.explain(m, images, "legrad", target=[1, 2, 3])
