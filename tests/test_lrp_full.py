"""Full LRP (``lrp``, Chefer et al.'s "LRP" baseline, ``generate_LRP(method="full")``) against a slow
float64 reference written here: the block-by-block relevance of ``test_lrp_chefer.slow_chefer`` (the
paper's rules with explicit contribution tensors), then the position-embedding ``Add.relprop`` and the
patch convolution's z^B rule written with explicit per-(pixel, output channel) contributions on the
library's own patch embedding, summed over colour channels."""
from __future__ import annotations

import pytest
import torch
from test_lrp_attnlrp import _model_params
from test_lrp_chefer import _norm_ref, _setup, slow_chefer

import vitlens
from vitlens.errors import InputError, UnsupportedModelError
from vitlens.methods import get_method
from vitlens.methods.lrp import zb_conv_relevance


def _zb_ref(x, W, R, patch):
    """z^B rule with explicit contributions c[b, n, i, j] = x_i w_ij - l w+_ij - h w-_ij for input i of
    patch n and output channel j (non-overlapping patches, stride = kernel)."""
    B, C, H, Wd = x.shape
    gh, gw = H // patch, Wd // patch
    cols = x.unfold(2, patch, patch).unfold(3, patch, patch)  # (B, C, gh, gw, p, p)
    cols = cols.permute(0, 2, 3, 1, 4, 5).reshape(B, gh * gw, C * patch * patch)  # (B, N, I)
    w = W.reshape(W.shape[0], -1).T  # (I, J)
    lo = x.reshape(B, -1).min(1).values[:, None, None, None]
    hi = x.reshape(B, -1).max(1).values[:, None, None, None]
    c = cols[..., None] * w - lo * w.clamp(min=0) - hi * w.clamp(max=0)  # (B, N, I, J)
    z = c.sum(2, keepdim=True) + 1e-9
    r_in = (c / z * R[:, :, None, :]).sum(-1)  # (B, N, I)
    r_in = r_in.reshape(B, gh, gw, C, patch, patch).permute(0, 3, 1, 4, 2, 5).reshape(B, C, H, Wd)
    return r_in


def _embedding_pieces(family, m, x):
    """(tokens before the position embedding, position embedding, conv weight, patch) from the library."""
    if family == "timm":
        t = m.patch_embed(x)
        u = torch.cat([m.cls_token.expand(x.shape[0], -1, -1), t], 1)
        return u, m.pos_embed, m.patch_embed.proj.weight, m.patch_embed.proj.kernel_size[0]
    t = m._process_input(x)
    u = torch.cat([m.class_token.expand(x.shape[0], -1, -1), t], 1)
    return u, m.encoder.pos_embedding, m.conv_proj.weight, m.conv_proj.kernel_size[0]


@pytest.mark.parametrize("family", ["timm", "torchvision"])
def test_full_lrp_matches_slow_reference(family, images):
    m, a = _setup(family)
    m.double()  # both sides in float64: the add rule divides by u + pos, which amplifies float32 rounding
    target = torch.tensor([3, 8])
    res = get_method("lrp")(a, images.double(), target)
    blocks, final_ln, head = _model_params(family, m)
    with torch.no_grad():
        u, pos, W, patch = _embedding_pieces(family, m, images.double())
    _, _, _, R = slow_chefer(blocks, final_ln, head, u + pos, target, "normalize", return_input=True)
    R = R.detach()
    pos = pos.expand_as(u)
    z = u + pos
    r_u, _ = _norm_ref(u * R / z, pos * R / z, R)  # Add.relprop at the position embedding
    r_patch = r_u[:, 1:]  # class token dropped
    ref = _zb_ref(images.double(), W.double(), r_patch, patch).sum(1)
    assert ref.abs().max() > 0 and ref.std() > 0
    # float64 on both sides except the attention softmax, which vitlens always takes in float32
    # (blocks.attention_probs: relative error ~1e-7), amplified where u + pos nearly cancels in the add
    # rule: 1e-5 of the map's scale (a wrong rule moves values by O(1) of it)
    torch.testing.assert_close(res.maps.double(), ref, rtol=1e-4, atol=1e-5 * ref.abs().max().item())


def test_zb_rule_conserves_and_is_bounded():
    g = torch.Generator().manual_seed(0)
    conv = torch.nn.Conv2d(3, 5, 4, stride=4, bias=False).double()
    x = torch.randn(2, 3, 8, 8, generator=g).double()
    R = torch.rand(2, 5, 2, 2, generator=g).double()
    out = zb_conv_relevance(conv, x, R)
    torch.testing.assert_close(out.sum((1, 2, 3)), R.sum((1, 2, 3)))  # z^B conserves (all c_ij >= 0)
    assert (out >= -1e-12).all()


def test_full_lrp_families_batching_and_errors(images):
    from conftest import close_to_scale, wrap_tiny

    _, a = _setup("timm")
    whole = get_method("lrp")(a, images, [1, 2])
    split = get_method("lrp")(a, images, [1, 2], batch_size=1)
    close_to_scale(whole.maps, split.maps)  # batch of 2 vs 1: other float32 GEMM order
    for name in ("hf", "open_clip", "timm_deit_distilled", "hf_clip", "hf_deit_distilled"):
        ad = wrap_tiny(name)
        tg = "a photo of a dog" if name in ("open_clip", "hf_clip") else 1
        e = vitlens.explain(ad, images, "lrp", target=tg)
        assert e.maps.shape == (2, 64, 64) and torch.isfinite(e.maps).all(), name
        parts = ad.embed_parts(images)
        with torch.no_grad():
            emb = torch.cat([parts["prefix"], parts["patches"]], 1) + parts["pos"]
            emb = parts["post"](emb) if parts["post"] is not None else emb
            close_to_scale(emb, ad.embed(images))
    with pytest.raises(InputError, match="matmul_rule"):
        get_method("lrp")(a, images, 1, matmul_rule="x")
    with pytest.raises(UnsupportedModelError, match="lrp"):
        vitlens.explain(wrap_tiny("open_clip_siglip"), images, "lrp", target="a dog")
