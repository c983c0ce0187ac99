"""Attention-family baselines (raw attention, rollout, Chefer 2021, AttentionCAM, Grad-CAM, TAM,
BT-H, BT-T) against slow references written from the papers' equations, one image at a time, on
tiny models of several adapter families, plus prefix tokens, batching and clear errors.

The references get attention maps and their gradients independently of the methods' helpers: one
forward pass per image *and per layer*, in which only that layer's attention is replaced by a leaf
tensor (so the gradient is the full one), and every equation is written with explicit loops.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import vitlens
from vitlens.errors import InputError, UnsupportedModelError
from vitlens.methods import get_method

from conftest import IMG, TINY_FACTORIES

FAMILIES = ["timm_registers", "timm_deit_distilled", "hf", "torchvision", "open_clip"]
GRAD_FAMILIES = ["timm_registers", "torchvision", "open_clip"]  # gradient references are slower
PROMPTS = ["a photo of a dog", "a red car"]
CLASSES = [3, 7]


def make(name: str):
    m = TINY_FACTORIES[name]()
    if name == "torchvision":  # torchvision initialises the head to zero: no gradient would flow
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():
            m.heads.head.weight.copy_(torch.randn(m.heads.head.weight.shape, generator=g) * 0.5)
    return vitlens.wrap_model(m)


def targets_for(name):
    return PROMPTS if name == "open_clip" else CLASSES


def x_batch():
    g = torch.Generator().manual_seed(5)
    return torch.randn(2, 3, IMG, IMG, generator=g)


def ref_score(adapter, out, name, i, target):
    """The target logit of image i, written out (CLIP: logit_scale * cosine with the prompt)."""
    if name == "open_clip":
        t = adapter.encode_text([target[i]])[0]
        return adapter.logit_scale * (F.normalize(out[0].float(), dim=-1) * t).sum()
    return out[0, target[i]]


def ref_attn(adapter, x1):
    """All attention maps of one image (L, H, T, T)."""
    with torch.no_grad():
        return torch.stack(adapter.trace(x1, tokens=False, attn=True).attn)[:, 0].float()


def ref_grad(adapter, x1, name, i, target, layer, site="attn"):
    """(value, d score / d value) at one site of one layer for one image, through a leaf replacement."""
    store = {}

    def hook(l, t):
        if l == layer:
            store["v"] = t.detach().clone().requires_grad_(True)
            return store["v"]
        return None

    with torch.enable_grad():
        hooks = {site: hook}
        if site != "attn":
            hooks["attn"] = lambda l, a: None
        out = adapter.forward(x1, hooks=hooks)
        s = ref_score(adapter, out, name, i, target)
        (g,) = torch.autograd.grad(s, store["v"])
    return store["v"].detach()[0].float(), g[0].float()


def ours(adapter, x, method, target, **params):
    res = get_method(method).fn(adapter, adapter.check_input(x), target, **params)
    return res.token_maps.float()


def close(a, b, rtol=2e-4):
    assert float(b.abs().max()) > 0, "degenerate reference: an all-zero map tests nothing"
    torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * float(b.abs().max()) + 1e-12)


def grid(adapter, row):
    P = adapter.num_prefix_tokens
    gh = gw = IMG // 16
    return row[P:].reshape(gh, gw)


# ----------------------------------------------------------------------------- raw attention, rollout
@pytest.mark.parametrize("name", FAMILIES)
def test_raw_attention_matches_reference(name):
    a = make(name)
    x = x_batch()
    got = ours(a, x, "raw_attention", targets_for(name))
    cls = a.cls_index
    for i in range(2):
        A = ref_attn(a, x[i:i + 1])[-1]  # (H, T, T)
        row = sum(A[h, cls] for h in range(A.shape[0])) / A.shape[0]
        close(got[i], grid(a, row))


@pytest.mark.parametrize("name,fusion", [("timm_deit_distilled", "mean"), ("hf", "max"), ("open_clip", "mean")])
def test_rollout_matches_paper(name, fusion):
    a = make(name)
    x = x_batch()
    got = ours(a, x, "rollout", targets_for(name), head_fusion=fusion)
    cls = a.cls_index
    for i in range(2):
        A = ref_attn(a, x[i:i + 1])
        T = A.shape[-1]
        joint = torch.eye(T)
        for l in range(A.shape[0]):
            W = A[l].mean(0) if fusion == "mean" else A[l].max(0).values
            if fusion == "mean":
                aug = 0.5 * W + 0.5 * torch.eye(T)  # Abnar & Zuidema: A = 0.5 W_att + 0.5 I
            else:
                aug = (W + torch.eye(T)) / (W + torch.eye(T)).sum(-1, keepdim=True)
            joint = aug @ joint  # Ã(l) = A(l) Ã(l-1)
        close(got[i], grid(a, joint[cls]))


def test_rollout_discard_ratio():
    a = make("timm_registers")
    x = x_batch()
    got = ours(a, x, "rollout", CLASSES, discard_ratio=0.3)
    for i in range(2):
        A = ref_attn(a, x[i:i + 1])
        T = A.shape[-1]
        joint = torch.eye(T)
        for l in range(A.shape[0]):
            W = A[l].mean(0).clone()
            vals = W.flatten().tolist()
            order = sorted(range(T * T), key=lambda k: (vals[k], k))
            order = [k for k in order if k != 0][: int(0.3 * T * T)]
            for k in order:
                W[k // T, k % T] = 0.0
            aug = W + torch.eye(T)
            joint = (aug / aug.sum(-1, keepdim=True)) @ joint
        close(got[i], grid(a, joint[0]))


# ----------------------------------------------------------------------------- gradient methods
@pytest.mark.parametrize("name", GRAD_FAMILIES + ["hf"])
def test_chefer2_matches_reference(name):
    a = make(name)
    x = x_batch()
    tg = targets_for(name)
    got = ours(a, x, "chefer2", tg)
    cls = a.cls_index
    for i in range(2):
        x1 = x[i:i + 1]
        R = None
        for l in range(a.num_blocks):
            A, G = ref_grad(a, x1, name, i, tg, l)
            H, T, _ = A.shape
            if R is None:
                R = torch.eye(T)
            abar = sum(torch.clamp(G[h] * A[h], min=0) for h in range(H)) / H  # eq. 5
            R = R + abar @ R  # eq. 6
        close(got[i], grid(a, R[cls]))


@pytest.mark.parametrize("name", GRAD_FAMILIES)
@pytest.mark.parametrize("relu", [True, False])
def test_attention_cam_matches_reference(name, relu):
    a = make(name)
    x = x_batch()
    tg = targets_for(name)
    got = ours(a, x, "attention_cam", tg, relu=relu)
    cls, P = a.cls_index, a.num_prefix_tokens
    for i in range(2):
        A, G = ref_grad(a, x[i:i + 1], name, i, tg, a.num_blocks - 1)
        H = A.shape[0]
        cam = torch.zeros(A.shape[-1])
        for h in range(H):
            w = G[h, cls, P:].sum() / G[h, cls, P:].numel()
            cam += w * A[h, cls]
        cam = cam / H
        if relu:
            if float(cam.max()) <= 0:  # the ReLU map of this image is all zero: compare exactly
                assert float(got[i].abs().max()) == 0
                continue
            cam = torch.clamp(cam, min=0)
        close(got[i], grid(a, cam))


@pytest.mark.parametrize("name,site", [("timm_avgpool", "output"), ("timm_registers", "input"),
                                       ("hf", "norm1"), ("open_clip", "input")])
def test_gradcam_matches_reference(name, site):
    a = make(name)
    x = x_batch()
    tg = targets_for(name)
    got = ours(a, x, "gradcam", tg, site=site)
    P = a.num_prefix_tokens
    checked = 0
    for i in range(2):
        Z, G = ref_grad(a, x[i:i + 1], name, i, tg, a.num_blocks - 1, site=site)
        D = Z.shape[-1]
        alpha = G[P:].sum(0) / (Z.shape[0] - P)
        pre = torch.stack([sum(alpha[k] * Z[t, k] for k in range(D)) / D for t in range(Z.shape[0])])
        cam = torch.relu(pre)
        if float(grid(a, cam).max()) == 0:  # ReLU killed the whole map of this image
            # a value at ~0 before the ReLU may round to either side: bound by the pre-ReLU scale
            assert float(got[i].abs().max()) <= 1e-5 * float(pre.abs().max())
            continue
        checked += 1
        close(got[i], grid(a, cam), rtol=5e-4)
    assert checked >= 1


def _ref_ig_last(a, x1, name, i, tg, steps):
    L = a.num_blocks
    total = 0
    for alpha in np.linspace(0, 1, steps):
        _, G = ref_grad(a, x1 * float(alpha), name, i, tg, L - 1)
        total = total + G
    return torch.clamp(total / steps, min=0).mean(0)  # (T, T)


@pytest.mark.parametrize("name", ["timm_registers", "open_clip"])
def test_tam_matches_reference(name):
    a = make(name)
    x = x_batch()
    tg = targets_for(name)
    got = ours(a, x, "tam", tg, steps=4)
    cls = a.cls_index
    for i in range(2):
        A = ref_attn(a, x[i:i + 1])
        L, T = A.shape[0], A.shape[-1]
        state = A[L - 1].mean(0)[cls]
        for l in range(L - 2, -1, -1):
            state = state @ (A[l].mean(0) + torch.eye(T))
        W = _ref_ig_last(a, x[i:i + 1], name, i, tg, 4)
        close(got[i], grid(a, state * W[cls]))


def _timm_vproj(a, l, z):
    blk = a.module.blocks[l]
    D = z.shape[-1]
    h = blk.norm1(z)
    v = F.linear(h, blk.attn.qkv.weight[2 * D:], blk.attn.qkv.bias[2 * D:])
    return v @ blk.attn.proj.weight.T


def _hf_vproj(a, l, z):
    vit = a.module.vit
    if hasattr(vit, "layers"):  # transformers >= 5
        layer = vit.layers[l]
        v_lin, out_lin = layer.attention.v_proj, layer.attention.o_proj
    else:
        layer = vit.encoder.layer[l]
        v_lin, out_lin = layer.attention.attention.value, layer.attention.output.dense
    return v_lin(layer.layernorm_before(z)) @ out_lin.weight.T


@pytest.mark.parametrize("name,variant", [("timm_deit_distilled", "bt_head"), ("hf", "bt_head"),
                                          ("timm_deit_distilled", "bt_token"), ("hf", "bt_token")])
def test_bt_matches_reference(name, variant):
    a = make(name)
    x = x_batch()
    tg = targets_for(name)
    got = ours(a, x, variant, tg, steps=3, layers=None)
    cls = a.cls_index
    for i in range(2):
        x1 = x[i:i + 1]
        with torch.no_grad():
            zs = a.trace(x1, tokens=True).tokens
            emb = a.embed(x1)
        R = None
        for l in range(a.num_blocks):
            A, G = ref_grad(a, x1, name, i, tg, l)
            H, T, _ = A.shape
            if R is None:
                R = torch.eye(T)
            if variant == "bt_head":
                I = torch.stack([(A[h].T @ G[h]).abs().mean() for h in range(H)])
                I = I / I.sum()
                abar = sum(I[h] * A[h] for h in range(H))
            else:
                z = (emb if l == 0 else zs[l - 1])[0]
                with torch.no_grad():
                    vp = (_timm_vproj if name.startswith("timm") else _hf_vproj)(a, l, z)
                m = torch.stack([vp[j].norm() / z[j].norm() for j in range(T)])
                abar = A.mean(0) @ torch.diag(m)
            R = R + abar @ R
        W = _ref_ig_last(a, x1, name, i, tg, 3)
        expl = W * (R if variant == "bt_head" else R.abs())
        close(got[i], grid(a, expl[cls]))


# ----------------------------------------------------------------------------- behaviour
def test_cls_methods_refuse_global_pool_models():
    a = make("timm_avgpool")
    for method in ["raw_attention", "rollout", "chefer2", "attention_cam", "tam", "bt_head", "bt_token"]:
        with pytest.raises(UnsupportedModelError, match="CLS token"):
            vitlens.explain(a, x_batch(), method=method, target=1)


def test_batch_equals_single_images_and_targets_matter():
    a = make("timm_registers")
    x = x_batch()
    for method, params in [("chefer2", {}), ("attention_cam", {"relu": False}), ("gradcam", {}), ("tam", {"steps": 3}),
                           ("bt_head", {"steps": 3, "layers": [1]})]:
        both = ours(a, x, method, CLASSES, batch_size=2, **params)
        for i in range(2):
            one = ours(a, x[i:i + 1], method, [CLASSES[i]], **params)
            close(both[i], one[0], rtol=1e-4)
        other = ours(a, x, method, [5, 1], **params)
        assert not torch.allclose(both, other), method


def test_bad_parameters_raise():
    a = make("timm_vit")
    x = x_batch()
    with pytest.raises(InputError, match="head_fusion"):
        vitlens.explain(a, x, "rollout", head_fusion="median")
    with pytest.raises(InputError, match="discard_ratio"):
        vitlens.explain(a, x, "rollout", discard_ratio=1.0)
    with pytest.raises(InputError, match="steps"):
        vitlens.explain(a, x, "tam", steps=1)
    with pytest.raises(InputError, match="layers"):
        vitlens.explain(a, x, "raw_attention", layers=[5])
    with pytest.raises(InputError, match="'start_layer' of method 'bt_head' is now 'layers'"):
        vitlens.explain(a, x, "bt_head", start_layer=3)
    with pytest.raises(InputError, match="site"):
        vitlens.explain(a, x, "gradcam", site="attn")


def test_methods_are_listed():
    names = set(vitlens.methods())
    assert {"raw_attention", "rollout", "chefer2", "attention_cam", "gradcam", "tam", "bt_head",
            "bt_token"} <= names


def test_non_square_grid():
    """A 64 x 96 input (4 x 6 patches): maps come back on the right grid, in row-major patch order."""
    from conftest import tiny_timm

    a = vitlens.wrap_model(tiny_timm("vit", img_size=(64, 96), reg_tokens=1))
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 64, 96, generator=g)
    got = ours(a, x, "chefer2", CLASSES)
    assert got.shape == (2, 4, 6)
    for i in range(2):
        R = None
        for l in range(a.num_blocks):
            A, G = ref_grad(a, x[i:i + 1], "timm", i, CLASSES, l)
            if R is None:
                R = torch.eye(A.shape[-1])
            R = R + torch.clamp(G * A, min=0).mean(0) @ R
        close(got[i], R[0, a.num_prefix_tokens:].reshape(4, 6))
    maps = vitlens.explain(a, x, "rollout", target=CLASSES).maps
    assert maps.shape == (2, 64, 96)
