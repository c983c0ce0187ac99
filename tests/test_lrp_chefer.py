"""Chefer et al.'s Transformer Attribution (``chefer1``) and partial LRP: conservation of every rule and
agreement with a slow reference written here from the paper's equations (explicit contribution tensors,
float64, its own forward pass and autograd), on tiny timm and torchvision ViTs."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from test_lrp_attnlrp import _ln_fwd, _model_params

import vitlens
from vitlens.errors import InputError, UnsupportedModelError
from vitlens.methods import get_method
from vitlens.methods._lrp_chefer import chefer_propagate
from vitlens.methods._lrp_rules import add_rule, matmul_rule, zplus_linear

from conftest import TINY_FACTORIES, close_to_scale, tiny_timm, tiny_torchvision

# ---------------------------------------------------------------------------- rule conservation


def test_zplus_rule_is_eq3_and_conserves():
    g = torch.Generator().manual_seed(0)
    x, W, R = torch.randn(3, 6, generator=g).double(), torch.randn(4, 6, generator=g).double(), torch.rand(3, 4, generator=g).double()
    c = (x[:, :, None] * W.T[None]).clamp(min=0)  # (x_j w_ij)^+
    ref = (c / c.sum(1, keepdim=True) * R[:, None, :]).sum(-1)
    out = zplus_linear(x, W, R)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(out.sum(-1), R.sum(-1))


def test_add_and_matmul_rules_conserve():
    g = torch.Generator().manual_seed(1)
    u, v, R = (torch.randn(2, 5, 4, generator=g).double() for _ in range(3))
    ru, rv = add_rule(u, v, R)
    torch.testing.assert_close(ru.sum((1, 2)) + rv.sum((1, 2)), R.sum((1, 2)))
    A = torch.rand(2, 3, 5, 5, generator=g).double().softmax(-1)
    V = torch.randn(2, 3, 5, 4, generator=g).double()
    RO = torch.randn(2, 3, 5, 4, generator=g).double()
    ra, rb = matmul_rule(A, V, RO, "normalize")
    torch.testing.assert_close(ra.sum((1, 2, 3)) + rb.sum((1, 2, 3)), RO.sum((1, 2, 3)))
    ha, hb = matmul_rule(A, V, RO, "half")
    torch.testing.assert_close(ha.sum((1, 2, 3)) + hb.sum((1, 2, 3)), RO.sum((1, 2, 3)))
    # without bias, both inputs of a product explain all of it, so the paper's normalisation is a halving
    torch.testing.assert_close(ra, ha)


@pytest.mark.parametrize("name", ["timm_vit", "torchvision", "hf", "timm_deit_distilled"])
def test_total_relevance_is_conserved_through_the_blocks(name, images):
    a = vitlens.wrap_model(TINY_FACTORIES[name]())
    if name == "torchvision":
        with torch.no_grad():
            a.module.heads.head.weight.normal_(0, 0.5)
    res = chefer_propagate(a, images, 2)
    # relevance starts at 1 and is redistributed by ratios (float32): rounding ~1e-6 per step, 1e-4 bound
    torch.testing.assert_close(res.rel_tokens.sum((1, 2)), torch.ones(2), atol=1e-4, rtol=1e-4)
    for l in range(a.num_blocks):  # half of each block's attention-branch relevance reaches the map
        torch.testing.assert_close(res.rel_attn[l].sum((1, 2, 3)), res.rel_heads[l].sum((1, 2, 3)) / 2,
                                   atol=1e-5, rtol=1e-3)


# ---------------------------------------------------------------------------- slow reference


def _zplus_ref(x, W, R):
    c = (x[..., :, None] * W.T).clamp(min=0)  # (..., in, out)
    z = c.sum(-2, keepdim=True)
    return (torch.where(z > 0, c / torch.where(z > 0, z, 1.0), 0.0) * R[..., None, :]).sum(-1)


def _norm_ref(ru, rv, R):
    """Chefer et al.'s normalisation of a binary operator's two relevances, per image."""
    out = []
    for b in range(R.shape[0]):
        su, sv, sr = ru[b].sum(), rv[b].sum(), R[b].sum()
        out.append((ru[b] * su.abs() / (su.abs() + sv.abs()) * sr / su, rv[b] * sv.abs() / (su.abs() + sv.abs()) * sr / sv))
    return torch.stack([o[0] for o in out]), torch.stack([o[1] for o in out])


def _matmul_ref(a, b, R, mode):
    """Deep Taylor rule for each factor: contribution a_ik b_kj of O_ij = sum_k a_ik b_kj."""
    c = a[..., :, :, None] * b[..., None, :, :]  # (..., i, k, j)
    O = c.sum(-2, keepdim=True)
    share = c / O * R[..., :, None, :]
    ra, rb = share.sum(-1), share.sum(-3)
    return (ra / 2, rb / 2) if mode == "half" else _norm_ref(ra, rb, R)


def slow_chefer(blocks, final_ln, head, emb, target, mode, return_input=False):
    """Forward (own code, autograd for grad A), then relevance per block from the paper's rules."""
    x = emb.double().requires_grad_(True)
    cache = []
    for p in blocks:
        H = p["heads"]
        h, _ = _ln_fwd(x, *p["ln1"])
        qkv = h @ p["qkv"][0].T + p["qkv"][1]
        B, N, C3 = qkv.shape
        hd = C3 // 3 // H
        q, k, v = qkv.reshape(B, N, 3, H, hd).permute(2, 0, 3, 1, 4)
        A = ((q @ k.transpose(-2, -1)) / math.sqrt(hd)).softmax(-1)
        O = A @ v
        ctx = O.transpose(1, 2).reshape(B, N, H * hd)
        b1 = ctx @ p["proj"][0].T + p["proj"][1]
        mid = x + b1
        h2, _ = _ln_fwd(mid, *p["ln2"])
        a1 = F.gelu(h2 @ p["fc1"][0].T + p["fc1"][1])
        b2 = a1 @ p["fc2"][0].T + p["fc2"][1]
        cache.append(dict(x=x, h=h, q=q, k=k, v=v, A=A, ctx=ctx, mid=mid, b1=b1, h2=h2, a1=a1, b2=b2))
        x = mid + b2
    grads_A = torch.autograd.grad(_logit_from(x, final_ln, head, target).sum(), [c["A"] for c in cache])
    final = x.detach()
    _, sd = _ln_fwd(final, *final_ln)
    # head: final LN (normaliser constant) + CLS + linear as one linear map; z+ rule, initial relevance 1
    gamma, _, _ = final_ln
    w_t = head[0][target]                                        # (B, D)
    u = w_t * gamma / sd[:, 0]                                   # d logit / d LN-centred input
    J = u - u.mean(-1, keepdim=True)                             # d logit / d x_cls with sd constant
    R = torch.zeros_like(final)
    R[:, 0] = (final[:, 0] * J).clamp(min=0)
    R = R / R.sum((1, 2), keepdim=True)
    rel_A = [None] * len(blocks)
    for l in reversed(range(len(blocks))):
        p, c = blocks[l], {k: t.detach() for k, t in cache[l].items()}
        out = c["mid"] + c["b2"]
        r_mid, r_b2 = _norm_ref(c["mid"] * R / out, c["b2"] * R / out, R)
        r_a1 = _zplus_ref(c["a1"], p["fc2"][0], r_b2)
        r_h2 = _zplus_ref(c["h2"], p["fc1"][0], r_a1)        # GELU, LayerNorm: identity
        r_mid = r_mid + r_h2
        r_x, r_b1 = _norm_ref(c["x"] * r_mid / c["mid"], c["b1"] * r_mid / c["mid"], r_mid)
        r_ctx = _zplus_ref(c["ctx"], p["proj"][0], r_b1)
        B, H, N, hd = c["v"].shape
        r_O = r_ctx.reshape(B, N, H, hd).transpose(1, 2)
        r_A, r_v = _matmul_ref(c["A"], c["v"], r_O, mode)
        rel_A[l] = (r_A, r_O)
        r_q, r_kt = _matmul_ref(c["q"], c["k"].transpose(-2, -1), r_A, mode)   # softmax: identity
        r_qkv = torch.stack([r_q, r_kt.transpose(-2, -1), r_v]).permute(1, 3, 0, 2, 4).reshape(B, N, -1)
        R = r_x + _zplus_ref(c["h"], p["qkv"][0], r_qkv)
    if return_input:  # relevance at the tokens entering block 0 (for full LRP)
        return rel_A, grads_A, [c["A"].detach() for c in cache], R
    return rel_A, grads_A, [c["A"].detach() for c in cache]


def _logit_from(x, final_ln, head, target):
    hf, _ = _ln_fwd(x, *final_ln)
    return (hf[:, 0] @ head[0].T + head[1])[torch.arange(len(target)), target]


def _setup(family):
    m = tiny_timm("vit") if family == "timm" else tiny_torchvision()
    if family == "torchvision":
        with torch.no_grad():
            m.heads.head.weight.normal_(0, 0.5)  # torchvision zero-initialises the classifier
    return m, vitlens.wrap_model(m)


@pytest.mark.parametrize("family", ["timm", "torchvision"])
@pytest.mark.parametrize("mode,start", [("normalize", 0), ("half", 1)])
def test_chefer1_matches_slow_reference(family, mode, start, images):
    m, a = _setup(family)
    target = torch.tensor([3, 8])
    res = get_method("chefer1")(a, images, target, matmul_rule=mode, layers=list(range(start, a.num_blocks)))
    blocks, final_ln, head = _model_params(family, m)
    rel_A, grads, _ = slow_chefer(blocks, final_ln, head, a.embed(images).detach(), target, mode)
    T = grads[0].shape[-1]
    C = torch.eye(T, dtype=torch.float64).expand(2, T, T)
    for l in range(start, len(blocks)):  # Abar = I + E_h[(grad A * R_A)^+], rolled out layer by layer
        abar = torch.eye(T, dtype=torch.float64) + (grads[l] * rel_A[l][0]).clamp(min=0).mean(1)
        C = torch.bmm(abar, C)
    ref = C[:, 0, 1:].float()
    torch.testing.assert_close(res.token_maps.reshape(2, -1), ref, rtol=1e-3, atol=1e-4 * ref.abs().max().item())
    assert ref.std() > 0


@pytest.mark.parametrize("family", ["timm", "torchvision"])
@pytest.mark.parametrize("variant", ["attention_relevance", "head_relevance"])
def test_partial_lrp_matches_slow_reference(family, variant, images):
    m, a = _setup(family)
    target = torch.tensor([5, 0])
    res = get_method("partial_lrp")(a, images, target, variant=variant)
    blocks, final_ln, head = _model_params(family, m)
    rel_A, _, attn = slow_chefer(blocks, final_ln, head, a.embed(images).detach(), target, "normalize")
    r_A, r_O = rel_A[-1]
    if variant == "attention_relevance":
        ref = r_A.clamp(min=0).mean(1)[:, 0, 1:]
    else:
        w = r_O.sum((2, 3)).clamp(min=0)  # relevance of each head's output
        ref = torch.stack([sum(w[b, h] * attn[-1][b, h, 0, 1:] for h in range(w.shape[1])) / w[b].sum()
                           for b in range(2)])
    ref = ref.float()
    torch.testing.assert_close(res.token_maps.reshape(2, -1), ref, rtol=1e-3, atol=1e-4 * ref.abs().max().item())


# ---------------------------------------------------------------------------- behaviour and errors


def test_chefer1_batching_and_explain(images):
    a = vitlens.wrap_model(tiny_timm("vit"))
    whole = get_method("chefer1")(a, images)
    split = get_method("chefer1")(a, images, batch_size=1)
    close_to_scale(split.token_maps, whole.token_maps, rtol=1e-4)  # batch of 2 vs 1: other GEMM shapes
    assert whole.target.index.tolist() == a.forward(images).argmax(-1).tolist()
    exp = vitlens.explain(a, images, method="partial_lrp", target=[1, 2])
    assert exp.maps.shape[0] == 2 and torch.isfinite(exp.maps).all()


def test_chefer_clear_errors(images):
    a = vitlens.wrap_model(tiny_timm("vit"))
    with pytest.raises(InputError, match="layers"):
        get_method("chefer1")(a, images, 1, layers=[5])
    with pytest.raises(InputError, match="matmul_rule"):
        get_method("chefer1")(a, images, 1, matmul_rule="third")
    with pytest.raises(InputError, match="variant"):
        get_method("partial_lrp")(a, images, 1, variant="x")
    a.blocks[0].modules["act"] = None
    with pytest.raises(UnsupportedModelError, match="act"):
        get_method("partial_lrp")(a, images, 1)
