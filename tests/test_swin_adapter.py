"""TimmSwinAdapter: the model's own forward, hooks at the Swin block sites, feature maps of any
stage/block, targets, and clear errors for what a hierarchical window-attention model cannot do."""
from __future__ import annotations

import pytest
import torch

import vitlens
from vitlens.errors import InputError, UnsupportedModelError
from vitlens.models.timm_swin import TimmSwinAdapter

from conftest import IMG, close_to_scale
from tiny_models import tiny_swin


@pytest.fixture
def swin():
    m = tiny_swin()
    return m, vitlens.wrap_model(m)


@pytest.fixture
def x():
    return torch.randn(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(1))


def test_wrap_and_metadata(swin):
    m, a = swin
    assert isinstance(a, TimmSwinAdapter) and a.hierarchical
    assert a.prefix_names == [] and a.cls_index is None and a.num_prefix_tokens == 0
    assert a.patch_size == (4, 4) and a.grid_size() == (16, 16) and a.input_size == (IMG, IMG)
    assert a.swin_blocks == [(0, 0), (1, 0), (2, 0), (2, 1), (3, 0)]
    assert a.stage_dims == [24, 48, 96, 192] and a.stage_heads == [1, 2, 2, 4]
    assert a.default_feature_layer == 3  # last block of the second-to-last stage
    assert a.num_classes == 10 and "Swin" in a.describe()


def test_forward_and_head_match_module(swin, x):
    m, a = swin  # a.forward runs the module itself: bit-identical
    with torch.no_grad():
        ref = m(x)
        torch.testing.assert_close(a.forward(x), ref, rtol=0, atol=0)
        last = m.layers(m.patch_embed(x))  # (B, 2, 2, 192)
        # our norm + pool + head vs the library's: same maths, float32 order may differ
        close_to_scale(a.head(last), ref, rtol=1e-5)
        close_to_scale(a.head(last.reshape(2, 4, 192)), ref, rtol=1e-5)
        torch.testing.assert_close(a.embed(x), m.patch_embed(x).reshape(2, 256, 24))


@pytest.mark.parametrize("site,attr", [("norm1", "norm1"), ("attn_branch", "drop_path1"), ("output", None),
                                       ("input", "in")])
@pytest.mark.parametrize("layer,where", [(None, (2, 1)), (0, (0, 0)), (-1, (3, 0)), ((1, 0), (1, 0)),
                                         ((-2, -2), (2, 0))])
def test_feature_maps_equal_library_hooks(swin, x, site, attr, layer, where):
    m, a = swin
    blk = m.layers[where[0]].blocks[where[1]]
    got = []
    if attr == "in":
        h = blk.register_forward_pre_hook(lambda mod, args: got.append(args[0]))
    else:
        mod = blk if attr is None else getattr(blk, attr)
        h = mod.register_forward_hook(lambda mod, args, out: got.append(out))
    with torch.no_grad():
        ref_out = m(x)
    h.remove()
    with torch.no_grad():
        out, feats = a.feature_maps(x, layer, site)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
    torch.testing.assert_close(feats, got[0].permute(0, 3, 1, 2), rtol=0, atol=0)
    g = IMG // 4 // 2 ** where[0]
    assert feats.shape == (2, a.stage_dims[where[0]], g, g)


def test_forward_hooks_can_read_and_replace(swin, x):
    m, a = swin
    seen = []
    with torch.no_grad():
        ref = m(x)
        out = a.forward(x, hooks={"output": lambda l, t: seen.append((l, tuple(t.shape)))})
        torch.testing.assert_close(out, ref, rtol=0, atol=0)
        assert [s[0] for s in seen] == [0, 1, 2, 3, 4]
        assert seen[0][1] == (2, 256, 24) and seen[4][1] == (2, 4, 192)
        zeroed = a.forward(x, hooks={"attn_branch": lambda l, t: torch.zeros_like(t) if l == 4 else None})
        blk = m.layers[3].blocks[0]
        h = blk.drop_path1.register_forward_hook(lambda mod, args, o: torch.zeros_like(o))
        ref_zero = m(x)
        h.remove()
    torch.testing.assert_close(zeroed, ref_zero, rtol=0, atol=0)
    assert not torch.allclose(zeroed, ref)
    # hooks are removed afterwards
    with torch.no_grad():
        torch.testing.assert_close(a.forward(x), ref, rtol=0, atol=0)


def test_targets_and_scores(swin, x):
    m, a = swin
    with torch.no_grad():
        out = a.forward(x)
    t = a.resolve_target(None, outputs=out)
    assert t.index.tolist() == out.argmax(-1).tolist()
    torch.testing.assert_close(a.score(out, t, "prob"), out.softmax(-1).max(-1).values)


def test_unsupported_operations_fail_clearly(swin, x):
    m, a = swin
    with pytest.raises(UnsupportedModelError, match="tis.*Swin"):
        vitlens.explain(a, x, method="tis")
    for call in (lambda: a.trace(x, attn=True), lambda: a.forward_subset(a.embed(x), torch.zeros(2, 3, dtype=torch.long)),
                 lambda: a.run_blocks(a.embed(x)), lambda: a.run_block(0, a.embed(x))):
        with pytest.raises(UnsupportedModelError, match="Swin"):
            call()
    with pytest.raises(InputError, match="site"):
        a.feature_maps(x, None, "context")
    with pytest.raises(InputError, match="site"):
        a.forward(x, hooks={"attn": lambda l, t: None})
    with pytest.raises(InputError, match="out of range"):
        a.feature_maps(x, 5)
    with pytest.raises(InputError, match="stage 4"):
        a.feature_maps(x, (4, 0))
    with pytest.raises(InputError, match="block 2"):
        a.feature_maps(x, (2, 2))
