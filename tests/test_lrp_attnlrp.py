"""AttnLRP / CP-LRP: per-rule conservation, whole-model conservation, and agreement with a slow
layer-by-layer relevance propagation written here from the paper's rules (relevance space, float64),
on tiny timm and torchvision ViTs."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vitlens
from vitlens.errors import InputError, UnsupportedModelError
from vitlens.methods import get_method
from vitlens.methods._lrp_rules import _IdentityRule, epsilon_grad, layer_norm_const, scale_grad

from conftest import IMG, TINY_FACTORIES, close_to_scale, tiny_timm, tiny_torchvision

# ---------------------------------------------------------------------------- per-rule conservation


def test_uniform_rule_conserves_product_relevance():
    g = torch.Generator().manual_seed(0)
    A = torch.rand(2, 5, 5, generator=g).softmax(-1).requires_grad_()
    V = torch.randn(2, 5, 3, generator=g).requires_grad_()
    O = scale_grad(A, 0.5) @ scale_grad(V, 0.5)
    gO = torch.randn(O.shape, generator=g)
    gA, gV = torch.autograd.grad(O, [A, V], gO)
    R_out = (O * gO).sum()
    torch.testing.assert_close((A * gA).sum() + (V * gV).sum(), R_out)
    torch.testing.assert_close((A * gA).sum(), R_out / 2)  # half to each factor


def test_identity_rule_passes_relevance_elementwise():
    x = torch.randn(4, 7, generator=torch.Generator().manual_seed(0)).requires_grad_()
    y = _IdentityRule.apply(x, F.gelu(x).detach())
    gy = torch.randn(4, 7, generator=torch.Generator().manual_seed(1))
    (gx,) = torch.autograd.grad(y, x, gy)
    torch.testing.assert_close(y, F.gelu(x), rtol=0, atol=0)  # the rule returns the given output bit for bit
    close_to_scale(x * gx, y * gy, rtol=1e-5)  # x * (gy * y / x): a few roundings of each element


def test_layernorm_constant_std_is_conservative_without_bias():
    ln = nn.LayerNorm(6)
    with torch.no_grad():
        ln.weight.uniform_(0.5, 2.0, generator=torch.Generator().manual_seed(2))
        ln.bias.zero_()
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(0)).requires_grad_()
    y = layer_norm_const(ln, x)
    close_to_scale(y, ln(x), rtol=1e-5)  # our LayerNorm formula vs torch's kernel: float32 order differs
    gy = torch.randn(3, 6, generator=torch.Generator().manual_seed(1))
    (gx,) = torch.autograd.grad(y, x, gy)
    # sums of 6 terms: bound the rounding by the terms' magnitude, not by the (possibly ~0) sum
    torch.testing.assert_close((x * gx).sum(-1), (y * gy).sum(-1), rtol=0, atol=1e-5 * float((y * gy).detach().abs().sum(-1).max()))


@pytest.mark.parametrize("eps", [0.0, 0.5])
def test_epsilon_rule(eps):
    torch.manual_seed(0)  # nn.Linear's initialisation: the same data on every run, whatever ran before
    lin = nn.Linear(5, 4)
    x = torch.randn(3, 5, requires_grad=True)
    z = epsilon_grad(lin(x), eps)
    R = torch.randn(3, 4)  # relevance of the outputs
    zd = z.detach()
    (gx,) = torch.autograd.grad(z, x, R / zd)  # gradient that carries R at z
    expected = x.detach() * ((R / (zd + eps * torch.where(zd >= 0, 1.0, -1.0))) @ lin.weight.detach())
    # R / z can be large where z ~ 0: bound the rounding by the scale of the terms
    close_to_scale(x * gx, expected, rtol=1e-5)
    if eps == 0:  # conservation up to the bias' share
        terms = (x * gx).detach()
        torch.testing.assert_close(terms.sum(-1), (R * (zd - lin.bias.detach()) / zd).sum(-1), rtol=0,
                                   atol=1e-5 * float(terms.abs().sum(-1).max()))


# ---------------------------------------------------------------------------- whole model


def _conserves(res) -> None:
    """total relevance == score, up to float32 rounding of the signed sum over tokens and channels: bounded
    relative to the magnitude of the summed relevances (a real leak, e.g. a bias' share, is ~10 % of it)."""
    scale = float(res.extras["relevance"].abs().sum(-1).max())
    torch.testing.assert_close(res.extras["total"], res.extras["score"], rtol=1e-4, atol=1e-4 * scale)


def _zero_biases(m: nn.Module) -> None:
    with torch.no_grad():
        for mod in m.modules():
            for n in ("bias", "in_proj_bias"):
                b = getattr(mod, n, None)
                if isinstance(b, torch.Tensor):
                    b.zero_()
            if isinstance(mod, nn.Linear) and mod.weight.abs().sum() == 0:  # torchvision zero-inits its head
                mod.weight.normal_(0, 0.5)


@pytest.mark.parametrize("name", sorted(TINY_FACTORIES))
def test_cp_lrp_conserves_total_relevance(name, images):
    """Without biases and with the softmax bypassed (CP-LRP), the token relevances sum to the score."""
    m = TINY_FACTORIES[name]()
    _zero_biases(m)
    a = vitlens.wrap_model(m)
    target = "a photo of a dog" if name == "open_clip" else [1, 7]
    res = get_method("attnlrp")(a, images, target, conservative=True)
    _conserves(res)
    assert res.extras["score"].abs().min() > 1e-3


def test_attnlrp_softmax_rule_is_the_only_leak(images):
    """AttnLRP's softmax rule (linearisation with bias) is not conservative: with biases removed, the
    total differs from the score, and equals it when q, k are bypassed."""
    m = tiny_timm("vit")
    _zero_biases(m)
    a = vitlens.wrap_model(m)
    res = get_method("attnlrp")(a, images, 3)
    assert not torch.allclose(res.extras["total"], res.extras["score"], atol=1e-4)


def test_model_left_unchanged(images):
    m = tiny_timm("vit")
    a = vitlens.wrap_model(m)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with torch.no_grad():
        ref = m(images)
    get_method("attnlrp")(a, images, 2, eps=0.1)
    assert all(not mod._forward_hooks for mod in m.modules())
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    with torch.no_grad():
        torch.testing.assert_close(m(images), ref, rtol=0, atol=0)


def test_explain_batches_and_default_target(images):
    a = vitlens.wrap_model(tiny_timm("vit"))
    whole = get_method("attnlrp")(a, images)
    split = get_method("attnlrp")(a, images, batch_size=1)
    close_to_scale(split.token_maps, whole.token_maps, rtol=1e-4)  # batch of 2 vs 1: other GEMM shapes
    assert whole.target.index.tolist() == a.forward(images).argmax(-1).tolist()
    exp = vitlens.explain(a, images, method="attnlrp", target=4)
    assert exp.maps.shape == (2, IMG, IMG)


def test_unknown_mlp_is_a_clear_error(images):
    a = vitlens.wrap_model(tiny_timm("vit"))
    a.blocks[1].modules["fc1"] = None
    with pytest.raises(UnsupportedModelError, match="fc1"):
        get_method("attnlrp")(a, images, 1)
    with pytest.raises(InputError):
        get_method("attnlrp")(vitlens.wrap_model(tiny_timm("vit")), images, 1, eps=-1.0)


# ---------------------------------------------------------------------------- slow reference


def _sgn(z):
    return torch.where(z >= 0, 1.0, -1.0).double()


def _lin(x, W, b, R, eps):
    """epsilon rule R_i = x_i sum_j w_ji R_j / (z_j + eps sign z_j)."""
    z = x @ W.T + (0 if b is None else b)
    return x * ((R / (z + eps * _sgn(z))) @ W)


def _ln_fwd(x, w, b, e):
    mu = x.mean(-1, keepdim=True)
    sd = ((x - mu) ** 2).mean(-1, keepdim=True).add(e).sqrt()
    return (x - mu) / sd * w + b, sd


def _ln_rel(x, w, b, e, R):
    """LayerNorm as the linear map y = diag(w / sd) (I - 11^T / D) x + b (sd constant), LRP-0."""
    y, sd = _ln_fwd(x, w, b, e)
    u = w * (R / y) / sd
    return x * (u - u.mean(-1, keepdim=True))


def _block_params_timm(blk):
    d = lambda t: None if t is None else t.detach().double()
    return dict(ln1=(d(blk.norm1.weight), d(blk.norm1.bias), blk.norm1.eps), qkv=(d(blk.attn.qkv.weight), d(blk.attn.qkv.bias)),
                proj=(d(blk.attn.proj.weight), d(blk.attn.proj.bias)), ln2=(d(blk.norm2.weight), d(blk.norm2.bias), blk.norm2.eps),
                fc1=(d(blk.mlp.fc1.weight), d(blk.mlp.fc1.bias)), fc2=(d(blk.mlp.fc2.weight), d(blk.mlp.fc2.bias)),
                heads=blk.attn.num_heads)


def _block_params_tv(blk):
    d = lambda t: None if t is None else t.detach().double()
    sa = blk.self_attention
    return dict(ln1=(d(blk.ln_1.weight), d(blk.ln_1.bias), blk.ln_1.eps), qkv=(d(sa.in_proj_weight), d(sa.in_proj_bias)),
                proj=(d(sa.out_proj.weight), d(sa.out_proj.bias)), ln2=(d(blk.ln_2.weight), d(blk.ln_2.bias), blk.ln_2.eps),
                fc1=(d(blk.mlp[0].weight), d(blk.mlp[0].bias)), fc2=(d(blk.mlp[3].weight), d(blk.mlp[3].bias)),
                heads=sa.num_heads)


def _model_params(name, m):
    d = lambda t: t.detach().double()
    if name == "timm":
        return [_block_params_timm(b) for b in m.blocks], (d(m.norm.weight), d(m.norm.bias), m.norm.eps), \
            (d(m.head.weight), d(m.head.bias))
    return [_block_params_tv(b) for b in m.encoder.layers], \
        (d(m.encoder.ln.weight), d(m.encoder.ln.bias), m.encoder.ln.eps), (d(m.heads.head.weight), d(m.heads.head.bias))


def slow_attnlrp(blocks, final_ln, head, emb, target, eps, conservative):
    """Forward, then relevance propagated block by block with explicit AttnLRP / CP-LRP messages."""
    x = emb.double()
    cache = []
    for p in blocks:  # forward
        H = p["heads"]
        h, _ = _ln_fwd(x, *p["ln1"])
        qkv = h @ p["qkv"][0].T + p["qkv"][1]
        B, N, C3 = qkv.shape
        hd = C3 // 3 // H
        q, k, v = qkv.reshape(B, N, 3, H, hd).permute(2, 0, 3, 1, 4)
        L = (q @ k.transpose(-2, -1)) / math.sqrt(hd)
        A = L.softmax(-1)
        O = A @ v
        ctx = O.transpose(1, 2).reshape(B, N, H * hd)
        b1 = ctx @ p["proj"][0].T + p["proj"][1]
        mid = x + b1
        h2, _ = _ln_fwd(mid, *p["ln2"])
        z1 = h2 @ p["fc1"][0].T + p["fc1"][1]
        a1 = F.gelu(z1)
        b2 = a1 @ p["fc2"][0].T + p["fc2"][1]
        cache.append(dict(x=x, h=h, q=q, k=k, v=v, L=L, A=A, O=O, ctx=ctx, mid=mid, b1=b1, h2=h2, a1=a1, b2=b2))
        x = mid + b2
    hf, _ = _ln_fwd(x, *final_ln)
    logits = hf[:, 0] @ head[0].T + head[1]
    R_logits = torch.zeros_like(logits)
    R_logits[torch.arange(len(target)), target] = logits[torch.arange(len(target)), target]
    R_hf = torch.zeros_like(hf)
    R_hf[:, 0] = _lin(hf[:, 0], head[0], head[1], R_logits, eps)
    R = _ln_rel(x, *final_ln, R_hf)
    for p, c in zip(reversed(blocks), reversed(cache)):
        out = c["mid"] + c["b2"]
        R_mid = c["mid"] * R / out            # residual: proportional split
        R_b2 = c["b2"] * R / out
        R_a1 = _lin(c["a1"], p["fc2"][0], p["fc2"][1], R_b2, eps)
        R_z1 = R_a1                            # GELU: identity rule
        R_h2 = _lin(c["h2"], p["fc1"][0], p["fc1"][1], R_z1, eps)
        R_mid = R_mid + _ln_rel(c["mid"], *p["ln2"], R_h2)
        R_x = c["x"] * R_mid / c["mid"]
        R_b1 = c["b1"] * R_mid / c["mid"]
        R_ctx = _lin(c["ctx"], p["proj"][0], p["proj"][1], R_b1, eps)
        B, H, N, hd = c["v"].shape
        R_O = R_ctx.reshape(B, N, H, hd).transpose(1, 2)
        A, v, O = c["A"], c["v"], c["O"]
        S = R_O / O
        if conservative:                       # A constant: all relevance to v
            R_v = v * (A.transpose(-2, -1) @ S)
            R_q = torch.zeros_like(c["q"])
            R_k = torch.zeros_like(c["k"])
        else:                                  # uniform rule on A v
            R_A = 0.5 * A * (S @ v.transpose(-2, -1))
            R_v = 0.5 * v * (A.transpose(-2, -1) @ S)
            L = c["L"]
            R_L = L * (R_A - A * R_A.sum(-1, keepdim=True))  # softmax (Prop. 3.1): x (R - s sum R)
            SL = R_L / L                       # uniform rule on q k^T / sqrt(hd)
            q, k = c["q"], c["k"]
            R_q = 0.5 * q * (SL @ k) / math.sqrt(hd)
            R_k = 0.5 * k * (SL.transpose(-2, -1) @ q) / math.sqrt(hd)
        R_qkv = torch.stack([R_q, R_k, R_v]).permute(1, 3, 0, 2, 4).reshape(B, N, 3 * H * hd)
        R_h = _lin(c["h"], p["qkv"][0], p["qkv"][1], R_qkv, eps)
        R = R_x + _ln_rel(c["x"], *p["ln1"], R_h)
    return R.sum(-1)


@pytest.mark.parametrize("family", ["timm", "torchvision"])
@pytest.mark.parametrize("eps,conservative", [(0.0, False), (0.05, False), (0.0, True)])
def test_attnlrp_matches_slow_reference(family, eps, conservative, images):
    m = tiny_timm("vit") if family == "timm" else tiny_torchvision()
    if family == "torchvision":
        with torch.no_grad():
            m.heads.head.weight.normal_(0, 0.5)  # torchvision zero-initialises the classifier
    a = vitlens.wrap_model(m)
    target = torch.tensor([3, 8])
    res = get_method("attnlrp")(a, images, target, eps=eps, conservative=conservative)
    blocks, final_ln, head = _model_params(family, m)
    with torch.no_grad():
        ref = slow_attnlrp(blocks, final_ln, head, a.embed(images), target, eps, conservative).float()
    torch.testing.assert_close(res.extras["relevance"], ref, rtol=2e-3, atol=2e-4 * ref.abs().max().item())
    assert torch.equal(res.token_maps.reshape(2, -1).cpu(), res.extras["relevance"][:, 1:])


def test_clip_class_vocabulary_targets_conserve(images):
    """CLIP with a zero-shot vocabulary: class indices explain the cosine with that class's prompt."""
    m = TINY_FACTORIES["open_clip"]()
    _zero_biases(m)
    a = vitlens.wrap_model(m)
    a.set_classes(["dog", "cat", "bird"])
    res = get_method("attnlrp")(a, images, [2, 0], conservative=True)
    _conserves(res)
    with torch.no_grad():
        cos = F.normalize(a.forward(images).float(), dim=-1) @ a.encode_text(["a photo of a bird.", "a photo of a dog."]).T
    torch.testing.assert_close(res.extras["score"], cos.diagonal())
