"""Issue 14 adapters: open_clip SigLIP (timm tower, attentional pooler), Hugging Face CLIPModel /
SiglipModel (prompts as targets) and Hugging Face distilled DeiT, on tiny random instances built from
each library's own config classes. Forward = the library's forward, token subsets = the library's
encoder on the reduced sequence, attention capture = the library's eager attention, prompts scored as
the library scores them, every registered method either runs or gives the clear
UnsupportedModelError, and ``load_model`` reads local files saved from the tiny models."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import vitlens
from vitlens.errors import TargetError, UnsupportedModelError
from vitlens.methods import method_names

from conftest import IMG, TEXT_FAMILIES, VLM_FACTORIES, close_to_scale, toy_tokenizer, wrap_tiny

NAMES = sorted(VLM_FACTORIES)
PROMPTS = ["a photo of a dog", "a red car"]


def _feat(out):
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _library_forward(name, m, x):
    if name == "open_clip_siglip":
        return m.encode_image(x)
    if name in ("hf_clip", "hf_siglip"):
        return _feat(m.get_image_features(pixel_values=x))
    return m(pixel_values=x).logits


def _library_from_tokens(name, m, seq):
    """The library's own encoder + head on an already-embedded token sequence."""
    if name == "open_clip_siglip":
        t = m.visual.trunk
        return m.visual.head(t.forward_head(t.norm(t.blocks(seq))))
    if name == "hf_clip":
        vm = m.vision_model
        h = vm.encoder(inputs_embeds=seq).last_hidden_state
        return m.visual_projection(vm.post_layernorm(h[:, 0]))
    if name == "hf_siglip":
        vm = m.vision_model
        return vm.head(vm.post_layernorm(vm.encoder(inputs_embeds=seq).last_hidden_state))
    h = m.deit.layernorm(m.deit.encoder(seq).last_hidden_state if hasattr(m.deit, "encoder")
                         else _run_layers(m.deit.layers, seq))
    return (m.cls_classifier(h[:, 0]) + m.distillation_classifier(h[:, 1])) / 2


def _run_layers(layers, h):
    for layer in layers:
        h = layer(h)
        h = h[0] if isinstance(h, tuple) else h
    return h


@pytest.mark.parametrize("name", NAMES)
def test_forward_and_explicit_attention_match_library(name, images):
    m = VLM_FACTORIES[name]()
    a = wrap_tiny(name, m)
    with torch.no_grad():
        ref = _library_forward(name, m, images)
        ours = a.forward(images)
        manual = a.forward(images, hooks={"attn": lambda l, t: None})
    close_to_scale(ours, ref)
    close_to_scale(manual, ref)
    if a.pool == "map":  # the pooler written out (used by LeGrad) is the library's pooler
        with torch.no_grad():
            seen = []
            pooled = a.head_with_pool_attention(a.run_blocks(a.embed(images)), lambda p: seen.append(p))
        close_to_scale(pooled, ref)
        assert seen[0].shape == (2, a.num_heads, 1, 16)
        torch.testing.assert_close(seen[0].sum(-1), torch.ones(2, a.num_heads, 1))


@pytest.mark.parametrize("name", NAMES)
def test_token_subsets_equal_library_encoder_on_reduced_sequence(name, images):
    m = VLM_FACTORIES[name]()
    a = wrap_tiny(name, m)
    keep = torch.tensor([[0, 3, 5, 9, 15], [1, 2, 4, 8, 12]])
    P = a.num_prefix_tokens
    with torch.no_grad():
        emb = a.embed(images)
        ours = a.forward_subset(emb, keep)
        seq = torch.cat([emb[:, :P], torch.stack([emb[b, P + keep[b]] for b in range(2)])], 1)
        ref = _library_from_tokens(name, m, seq)
        full = a.forward_subset(emb, torch.arange(16).expand(2, 16))
    close_to_scale(ours, ref)
    close_to_scale(full, a.forward(images))


@pytest.mark.parametrize("name", ["hf_clip", "hf_siglip", "hf_deit_distilled"])
def test_attention_capture_equals_library_eager_attention(name, images):
    m = VLM_FACTORIES[name]()
    a = wrap_tiny(name, m)
    if hasattr(m, "set_attn_implementation"):
        m.set_attn_implementation("eager")
    else:  # pragma: no cover - transformers 4.x
        m.config._attn_implementation = "eager"
    with torch.no_grad():
        tr = a.trace(images, attn=True)
        body = m.deit if name == "hf_deit_distilled" else m.vision_model
        lib = body(pixel_values=images, output_attentions=True).attentions
    assert len(tr.attn) == len(lib) == a.num_blocks
    for ours, ref in zip(tr.attn, lib):
        close_to_scale(ours, ref)  # same softmax, other float32 order


@pytest.mark.parametrize("name", NAMES)
def test_hooks_see_and_replace_every_block(name, images):
    a = wrap_tiny(name)
    seen = []
    with torch.no_grad():
        clean = a.forward(images)
        uniform = a.forward(images, hooks={"attn": lambda l, t: (seen.append(l), torch.full_like(t, 1 / t.shape[-1]))[1]})
    assert seen == list(range(a.num_blocks))
    assert not torch.allclose(clean, uniform)
    with torch.no_grad():
        _, feats = a.feature_maps(images)
    assert feats.shape == (2, 32, 4, 4)


def _library_prompt_logits(name, m, x, prompts):
    """(B, P) logits the library itself computes for images x and prompts."""
    if name == "open_clip_siglip":
        import open_clip

        img = F.normalize(m.encode_image(x), dim=-1)
        txt = F.normalize(m.encode_text(open_clip.tokenize(prompts)), dim=-1)
        return m.logit_scale.exp() * img @ txt.T + m.logit_bias
    return m(input_ids=toy_tokenizer(prompts), pixel_values=x).logits_per_image


@pytest.mark.parametrize("name", ["open_clip_siglip", "hf_clip", "hf_siglip"])
def test_prompts_are_scored_as_the_library_does(name, images):
    m = VLM_FACTORIES[name]()
    a = wrap_tiny(name, m)
    assert a.supports_text
    with torch.no_grad():
        ref = _library_prompt_logits(name, m, images, PROMPTS)  # (2, 2)
        out = a.forward(images)
    for j, p in enumerate(PROMPTS):
        t = a.resolve_target(p, batch=2)
        close_to_scale(a.score(out, t, "logit"), ref[:, j])
        cos = (ref[:, j] - (a.logit_bias if a.logit_bias is not None else 0)) / a.logit_scale
        close_to_scale(a.score(out, t, "similarity"), cos)
    with pytest.raises(TargetError, match="prob"):
        a.score(out, a.resolve_target(PROMPTS, batch=2), "prob")
    a.set_classes(["dog", "car", "tree"])  # zero-shot vocabulary
    assert a.resolve_target("car", batch=1).index.tolist() == [1]
    assert a.resolve_target(None, outputs=out).index.tolist() == a.class_logits(out).argmax(-1).tolist()


def test_hf_text_models_without_tokenizer_give_a_clear_error(images):
    a = vitlens.wrap_model(VLM_FACTORIES["hf_clip"]())
    with pytest.raises(TargetError, match="tokenizer"):
        a.resolve_target("a dog", batch=2)


def test_hf_deit_prefix_tokens_and_both_heads(images):
    m = VLM_FACTORIES["hf_deit_distilled"]()
    a = wrap_tiny("hf_deit_distilled", m)
    assert a.prefix_names == ["cls", "dist"] and a.cls_index == 0 and a.num_classes == 10
    with torch.no_grad():
        tr = a.trace(images)
        t = m.deit.layernorm(tr.tokens[-1])
        expected = (m.cls_classifier(t[:, 0]) + m.distillation_classifier(t[:, 1])) / 2
    torch.testing.assert_close(tr.outputs, expected)


CHEAP = {"rise": dict(n_masks=4), "occlusion": dict(window=32), "integrated_gradients": dict(n_steps=2),
         "smoothgrad": dict(n_samples=2), "tis": dict(n_masks=8, max_iter=5), "bt_head": dict(steps=2, layers=None),
         "bt_token": dict(steps=2, layers=None), "tam": dict(steps=2), "textspan": dict(layers=1)}
NEEDS_CLS = {"raw_attention", "rollout", "attention_cam", "chefer1", "chefer2", "partial_lrp", "tam",
             "bt_head", "bt_token", "textspan"}


@pytest.mark.parametrize("name", NAMES)
def test_every_method_runs_or_gives_the_clear_error(name, images):
    """Each registered method runs (finite maps of the right shape) or refuses with a one-line
    UnsupportedModelError; on pooler models (no CLS row) the CLS-row methods refuse, LeGrad runs."""
    a = wrap_tiny(name)
    target = PROMPTS[0] if name in TEXT_FAMILIES else 1
    x = images[:1]  # one image keeps this sweep over ~20 methods x 4 families short
    ran, refused = set(), set()
    for method in method_names():
        if method == "vitcx":
            continue  # clustering of feature maps: covered on every family by tests/test_vitcx.py
        try:
            e = vitlens.explain(a, x, method, target=target, **CHEAP.get(method, {}))
        except UnsupportedModelError as err:
            assert "\n" not in str(err)
            refused.add(method)
            continue
        assert e.maps.shape == (1, IMG, IMG) and torch.isfinite(e.maps).all(), method
        ran.add(method)
    assert {"legrad", "gradcam", "rise", "occlusion", "integrated_gradients"} <= ran
    if a.pool == "map":
        assert NEEDS_CLS - {"textspan"} <= refused
    else:
        assert {"raw_attention", "rollout", "chefer2", "attention_cam"} <= ran


# ---------------------------------------------------------------------------- load_model, local files


def test_load_hf_dual_encoders_and_deit_from_saved_folders(tmp_path):
    for name in ("hf_clip", "hf_siglip", "hf_deit_distilled"):
        m = VLM_FACTORIES[name]()
        folder = tmp_path / name
        m.save_pretrained(folder)
        a = vitlens.load_model(f"hf:{folder}")
        assert type(a).__name__ == type(wrap_tiny(name, m)).__name__
        for (k, v), (k2, v2) in zip(m.state_dict().items(), a.module.state_dict().items()):
            assert k == k2 and torch.equal(v, v2), (name, k)
    # weights= a saved folder for a hub name: the hub name is only a label, nothing is downloaded
    a = vitlens.load_model("hf:openai/clip-vit-base-patch16", weights=str(tmp_path / "hf_clip"))
    assert type(a).__name__ == "HFCLIPAdapter"


def test_load_open_clip_siglip_config_with_local_checkpoint(tmp_path):
    import open_clip

    from conftest import _register_tiny_siglip_trunk

    m = VLM_FACTORIES["open_clip_siglip"]()
    cfg = dict(embed_dim=32, init_logit_bias=-10, custom_text=True,
               vision_cfg=dict(image_size=IMG, timm_model_name=_register_tiny_siglip_trunk(),
                               timm_model_pretrained=False, timm_pool="map", timm_proj="none"),
               text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=1, no_causal_mask=True,
                             pool_type="last", proj_bias=True))
    cfg_file = tmp_path / "vitlens-tiny-SigLIP.json"
    cfg_file.write_text(json.dumps(cfg))
    open_clip.add_model_config(cfg_file)  # open_clip's own registry of model configs (a local file)
    ckpt = tmp_path / "vitlens-tiny-SigLIP.pt"
    torch.save(m.state_dict(), ckpt)
    a = vitlens.load_model("open_clip:vitlens-tiny-SigLIP", weights=str(ckpt))
    assert type(a).__name__ == "OpenCLIPTimmAdapter" and a.pool == "map"
    x = torch.randn(1, 3, IMG, IMG)
    with torch.no_grad():
        close_to_scale(a.forward(x), m.encode_image(x))


def test_hf_deit_without_teacher_reads_the_class_token(images):
    from transformers import DeiTConfig, DeiTForImageClassification

    torch.manual_seed(0)
    m = DeiTForImageClassification(DeiTConfig(image_size=IMG, patch_size=16, hidden_size=32, num_hidden_layers=2,
                                              num_attention_heads=2, intermediate_size=64, num_labels=10)).eval()
    a = vitlens.wrap_model(m)
    assert a.prefix_names == ["cls", "dist"] and not a.distilled
    with torch.no_grad():
        close_to_scale(a.forward(images), m(pixel_values=images).logits)
