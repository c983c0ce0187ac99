"""Adapter layer: the canonical blocks reproduce each library's forward, token subsets, prefix
tokens, attention capture under fused attention, and clear errors."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import vitlens
from vitlens.errors import InputError, TargetError, UnsupportedModelError

from conftest import IMG, TINY_FACTORIES, close_to_scale, tiny_timm


def _module(name):
    module = TINY_FACTORIES[name]()
    if name == "torchvision":  # torchvision zero-initialises its head: all-zero logits would test nothing
        with torch.no_grad():
            module.heads.head.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    return module


def _reference_forward(name, module, x):
    if name == "hf":
        return module(x).logits
    if name == "open_clip":
        return module.encode_image(x)
    return module(x)


@pytest.mark.parametrize("name", sorted(TINY_FACTORIES))
def test_forward_matches_library(name, images):
    module = _module(name)
    a = vitlens.wrap_model(module)
    with torch.no_grad():
        ours = a.forward(images)
        ref = _reference_forward(name, module, images)
        # the explicit-attention path (used when a method captures attention) must agree too
        manual = a.forward(images, hooks={"attn": lambda l, t: None})
    # canonical blocks vs the library's own forward (fused SDPA vs explicit softmax): same maths, other float32 order
    close_to_scale(ours, ref, rtol=1e-4)
    close_to_scale(manual, ref, rtol=1e-4)


@pytest.mark.parametrize("name", sorted(TINY_FACTORIES))
def test_subset_with_all_tokens_equals_forward(name, images):
    a = vitlens.wrap_model(_module(name))
    with torch.no_grad():
        emb = a.embed(images)
        n = emb.shape[1] - a.num_prefix_tokens
        full = a.forward_subset(emb, torch.arange(n).expand(images.shape[0], n))
        ref = a.forward(images)
    close_to_scale(full, ref, rtol=1e-4)  # gathered tokens, another attention kernel: same maths, other order


def test_subset_equals_model_on_reduced_sequence(images):
    """Dropping tokens = running the library's own blocks on the reduced sequence."""
    m = tiny_timm("vit", reg_tokens=2)
    a = vitlens.wrap_model(m)
    keep = torch.tensor([[0, 3, 5, 9, 15], [1, 2, 4, 8, 12]])
    with torch.no_grad():
        emb = a.embed(images)
        ours = a.forward_subset(emb, keep)
        P = a.num_prefix_tokens
        seq = torch.cat([emb[:, :P], torch.stack([emb[b, P + keep[b]] for b in range(2)])], 1)
        ref = m.forward_head(m.norm(m.blocks(seq)))
    close_to_scale(ours, ref, rtol=1e-4)


def test_subset_image_index_routes_rows(images):
    a = vitlens.wrap_model(tiny_timm("vit"))
    keep = torch.tensor([[0, 1, 2], [0, 1, 2], [0, 1, 2]])
    with torch.no_grad():
        emb = a.embed(images)
        out = a.forward_subset(emb, keep, torch.tensor([1, 0, 1]))
        one = a.forward_subset(emb[1:2], keep[:1])
    # a batch of 3 vs a batch of 1: GEMMs of other shapes, not bit-identical
    close_to_scale(out[0], one[0], rtol=1e-4)
    close_to_scale(out[2], one[0], rtol=1e-4)
    assert (out[1] - one[0]).abs().max() > 1e-2 * one[0].abs().max()  # the other image's tokens


@pytest.mark.parametrize("variant,names", [
    ("vit", ["cls"]),
    ("deit_distilled", ["cls", "dist"]),
])
def test_prefix_tokens(variant, names):
    a = vitlens.wrap_model(tiny_timm(variant))
    assert a.prefix_names == names and a.cls_index == 0


def test_register_and_global_pool_prefix_tokens():
    a = vitlens.wrap_model(tiny_timm("vit", reg_tokens=4))
    assert a.prefix_names == ["cls", "reg0", "reg1", "reg2", "reg3"]
    g = vitlens.wrap_model(tiny_timm("vit", class_token=False, global_pool="avg"))
    assert g.prefix_names == [] and g.cls_index is None and g.pool == "avg"


def test_distilled_head_averages_both_tokens(images):
    m = tiny_timm("deit_distilled")
    a = vitlens.wrap_model(m)
    with torch.no_grad():
        tr = a.trace(images)
        t = m.norm(tr.tokens[-1])
        expected = (m.head(t[:, 0]) + m.head_dist(t[:, 1])) / 2
    torch.testing.assert_close(tr.outputs, expected)


@pytest.mark.parametrize("name", sorted(TINY_FACTORIES))
def test_attention_capture_with_fused_attention(name, images):
    """Attention probabilities are captured (rows sum to 1) even where the library runs SDPA."""
    a = vitlens.wrap_model(TINY_FACTORIES[name]())
    with torch.no_grad():
        tr = a.trace(images, attn=True)
    assert len(tr.attn) == a.num_blocks and len(tr.tokens) == a.num_blocks
    T = a.num_prefix_tokens + 16
    assert tr.attn[0].shape == (2, a.num_heads, T, T)
    torch.testing.assert_close(tr.attn[0].sum(-1), torch.ones(2, a.num_heads, T))


def test_attention_matches_eager_timm(images):
    m = tiny_timm("vit")
    a = vitlens.wrap_model(m)
    got = []
    blk = m.blocks[0]
    blk.attn.fused_attn = False
    h = blk.attn.attn_drop.register_forward_hook(lambda mod, i, o: got.append(o))
    with torch.no_grad():
        m(images)
        tr = a.trace(images, attn=True)
    h.remove()
    # probabilities (<= 1) from the same logits computed in another order: float32 error ~1e-7
    torch.testing.assert_close(tr.attn[0], got[0], atol=1e-5, rtol=1e-5)


def test_grid_any_size():
    m = tiny_timm("vit", dynamic_img_size=True)
    a = vitlens.wrap_model(m)
    x = torch.randn(1, 3, 48, 80)
    assert a.grid_size(x) == (3, 5)
    with torch.no_grad():
        close_to_scale(a.forward(x), m(x), rtol=1e-4)


def test_unsupported_model_error_names_what_is_missing():
    with pytest.raises(UnsupportedModelError, match="unsupported model.*VisionTransformer"):
        vitlens.wrap_model(nn.Sequential(nn.Conv2d(3, 4, 3)))


def test_unsupported_timm_block_type():
    import timm

    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=IMG, depth=1, num_classes=3)
    m.blocks[0].attn = nn.Identity()
    with pytest.raises(UnsupportedModelError, match="qkv"):
        vitlens.wrap_model(m)


def test_input_errors(tiny_vit):
    with pytest.raises(InputError, match="batch"):
        tiny_vit.check_input(torch.randn(3, IMG, IMG))
    with pytest.raises(InputError, match="expects 64x64"):
        tiny_vit.check_input(torch.randn(1, 3, 32, 32))
    with pytest.raises(InputError, match="NaN"):
        tiny_vit.check_input(torch.full((1, 3, IMG, IMG), float("nan")))
    with pytest.raises(InputError, match="3 colour channels"):
        tiny_vit.check_input(torch.randn(1, 1, IMG, IMG))


def test_targets_resolve(tiny_vit, images):
    with torch.no_grad():
        out = tiny_vit.forward(images)
    t = tiny_vit.resolve_target(None, outputs=out)
    assert t.index.tolist() == out.argmax(-1).tolist()
    t = tiny_vit.resolve_target([3, 4], batch=2)
    assert t.index.tolist() == [3, 4]
    assert tiny_vit.resolve_target(7, batch=2).index.tolist() == [7, 7]
    with pytest.raises(TargetError, match="out of range.*10 classes"):
        tiny_vit.resolve_target(10, batch=1)
    with pytest.raises(TargetError, match="3 targets for 2 images"):
        tiny_vit.resolve_target([1, 2, 3], batch=2)
    with pytest.raises(TargetError, match="not a class name"):
        tiny_vit.resolve_target("a photo of a cat", batch=1)


def test_class_name_target_real_vocabulary():
    import timm

    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=IMG, depth=1)
    a = vitlens.wrap_model(m)
    assert a.resolve_target("goldfish", batch=1).index.tolist() == [1]
    assert a.resolve_target("tench, Tinca tinca", batch=1).index.tolist() == [0]


def test_scores(tiny_vit, images):
    with torch.no_grad():
        out = tiny_vit.forward(images)
    t = tiny_vit.resolve_target([2, 5], batch=2)
    torch.testing.assert_close(tiny_vit.score(out, t, "logit"), out[[0, 1], [2, 5]])
    torch.testing.assert_close(tiny_vit.score(out, t, "prob"), out.softmax(-1)[[0, 1], [2, 5]])


def test_clip_text_prompt_score(tiny_clip, images):
    import open_clip
    import torch.nn.functional as F

    t = tiny_clip.resolve_target(["a photo of a cat", "a dog"], batch=2)
    assert t.is_text.all() and t.labels == ["a photo of a cat", "a dog"]
    with torch.no_grad():
        img = tiny_clip.forward(images)
        txt = tiny_clip.module.encode_text(open_clip.tokenize(["a photo of a cat", "a dog"]))
    expected = (F.normalize(img, dim=-1) * F.normalize(txt, dim=-1)).sum(-1)
    # cosines (|.| <= 1): text features of another batch shape -> float32 rounding ~1e-6
    torch.testing.assert_close(tiny_clip.score(img, t, "similarity"), expected, atol=1e-5, rtol=1e-4)
    scale = tiny_clip.module.logit_scale.exp().item()
    torch.testing.assert_close(tiny_clip.score(img, t, "logit"), expected * scale, atol=1e-5 * float(scale), rtol=1e-4)
    with pytest.raises(TargetError, match="prob"):
        tiny_clip.score(img, t, "prob")


def test_clip_class_vocabulary(tiny_clip, images):
    tiny_clip.set_classes(["cat", "dog", "car"])
    with torch.no_grad():
        img = tiny_clip.forward(images)
    t = tiny_clip.resolve_target(None, outputs=img)
    logits = tiny_clip.class_logits(img)
    assert t.index.tolist() == logits.argmax(-1).tolist()
    assert tiny_clip.resolve_target("dog", batch=1).index.tolist() == [1]


def test_load_model_random_and_local_weights(tmp_path):
    import timm
    from safetensors.torch import save_file

    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=1)
    save_file(m.state_dict(), str(tmp_path / "vit_tiny_patch16_224.test.safetensors"))
    a = vitlens.load_model("vit_tiny_patch16_224", weights=str(tmp_path), depth=1)
    for (k, v), (k2, v2) in zip(m.state_dict().items(), a.module.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)


def test_missing_weights_is_clear(tmp_path, monkeypatch):
    monkeypatch.delenv("VITLENS_WEIGHTS", raising=False)
    with pytest.raises(vitlens.WeightsError, match="no weights file"):
        vitlens.load_model("vit_tiny_patch16_224", weights=str(tmp_path))
    with pytest.raises(vitlens.WeightsError, match="does not exist"):
        vitlens.load_model("vit_tiny_patch16_224", weights=str(tmp_path / "nope" / "w.safetensors"))


def test_env_weights_folder(real_model, monkeypatch):
    from conftest import REAL_MODEL, SHARED

    monkeypatch.setenv("VITLENS_WEIGHTS", str(SHARED / "models"))
    a = vitlens.load_model(REAL_MODEL)
    assert torch.equal(a.module.head.weight, real_model.module.head.weight)


def test_real_model_accuracy_on_shared_images(real_model, shared_pointing):
    """The real ViT-Ti classifies the shared images about as well as the shared README says (76.2 %)."""
    ds = shared_pointing[0]
    idx = list(range(0, len(ds), 5))  # 100 images
    x = real_model.preprocess([ds[i].path for i in idx])
    with torch.no_grad():
        pred = real_model.forward(x).argmax(-1)
    acc = (pred == torch.tensor([ds[i].label for i in idx])).float().mean().item()
    assert acc > 0.65
