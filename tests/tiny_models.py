"""Tiny randomly initialised models of every supported family, in one place: the factories the tests,
the contract tests (``tests/test_contract.py``) and the fixtures of ``conftest.py`` build models from.

``TINY_FACTORIES``: the classifier and CLIP families whose tests pick class or prompt targets by name;
``VLM_FACTORIES``: the vision-language and Hugging Face DeiT families; ``EXTRA_FACTORIES``: the
SigLIP-like timm ViT (attentional pooler) and Swin; :data:`ALL_FACTORIES` is their union. Every factory
seeds torch first, so a family's weights are the same in every test.
"""
from __future__ import annotations

import torch

IMG = 64  # tiny models take 64x64 inputs: a 4x4 patch grid with 16x16 patches


def _seeded(fn):
    torch.manual_seed(0)
    return fn()


def tiny_timm(variant: str = "vit", **kw):
    import timm

    base = dict(pretrained=False, img_size=IMG, depth=2, num_classes=10)
    base.update(kw)
    name = {"vit": "vit_tiny_patch16_224", "deit_distilled": "deit_tiny_distilled_patch16_224"}.get(variant, variant)
    return _seeded(lambda: timm.create_model(name, **base).eval())


def tiny_torchvision():
    import torchvision

    return _seeded(lambda: torchvision.models.VisionTransformer(
        image_size=IMG, patch_size=16, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=10).eval())


def tiny_hf():
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(image_size=IMG, patch_size=16, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                    intermediate_size=64, num_labels=10)
    return _seeded(lambda: ViTForImageClassification(cfg).eval())


def tiny_open_clip():
    import open_clip

    return _seeded(lambda: open_clip.CLIP(
        embed_dim=16, vision_cfg=dict(image_size=IMG, patch_size=16, width=32, layers=2, head_width=16),
        text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=1)).eval())


def _register_tiny_siglip_trunk() -> str:
    """A tiny SigLIP-shaped timm ViT (no class token, attentional pooler 'map'), registered under a
    timm name so that open_clip's ``TimmModel`` builds it from a plain model config (no download)."""
    from timm.models import is_model, register_model
    from timm.models.vision_transformer import VisionTransformer

    name = "vitlens_test_siglip_tiny"
    if not is_model(name):
        def vitlens_test_siglip_tiny(pretrained=False, **kw):
            for k in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
                kw.pop(k, None)
            args = dict(img_size=IMG, patch_size=16, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2,
                        class_token=False, global_pool="map")
            args.update(kw)
            return VisionTransformer(**args)

        register_model(vitlens_test_siglip_tiny)
    return name


def tiny_open_clip_siglip():
    """open_clip ``CustomTextCLIP`` laid out as ``ViT-B-16-SigLIP``'s config (timm tower, 'map' pool,
    no projection, non-causal text tower with last-token pooling, logit bias), at tiny sizes."""
    import open_clip

    trunk = _register_tiny_siglip_trunk()
    return _seeded(lambda: open_clip.CustomTextCLIP(
        embed_dim=32, init_logit_bias=-10,
        vision_cfg=dict(image_size=IMG, timm_model_name=trunk, timm_model_pretrained=False, timm_pool="map",
                        timm_proj="none"),
        text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=1, no_causal_mask=True,
                      pool_type="last", proj_bias=True)).eval())


HF_TEXT = dict(vocab_size=99, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
               max_position_embeddings=16, bos_token_id=97, eos_token_id=98, pad_token_id=0)
HF_VISION = dict(image_size=IMG, patch_size=16, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                 intermediate_size=64)


def toy_tokenizer(prompts):
    """Deterministic ids (B, 8) for the tiny Hugging Face text towers: a hash of each word, then EOS."""
    rows = []
    for p in prompts:
        ids = [1 + sum(ord(c) for c in w) % 90 for w in p.split()][:7]
        rows.append(ids + [98] + [0] * (7 - len(ids)))
    return torch.tensor(rows)


def tiny_hf_clip():
    from transformers import CLIPConfig, CLIPModel

    return _seeded(lambda: CLIPModel(CLIPConfig(text_config=HF_TEXT, vision_config=HF_VISION, projection_dim=16)).eval())


def tiny_hf_siglip():
    from transformers import SiglipConfig, SiglipModel

    return _seeded(lambda: SiglipModel(SiglipConfig(text_config=HF_TEXT, vision_config=HF_VISION)).eval())


def tiny_hf_deit():
    from transformers import DeiTConfig, DeiTForImageClassificationWithTeacher

    cfg = DeiTConfig(image_size=IMG, patch_size=16, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, num_labels=10)
    return _seeded(lambda: DeiTForImageClassificationWithTeacher(cfg).eval())


# The vision-language and HF-DeiT families of issue 14. Kept out of TINY_FACTORIES (whose tests pick
# class or prompt targets by family name and would all need a case each); tests/test_adapters_vlm.py
# runs the adapter contract and every registered method on them.
VLM_FACTORIES = {
    "open_clip_siglip": tiny_open_clip_siglip,
    "hf_clip": tiny_hf_clip,
    "hf_siglip": tiny_hf_siglip,
    "hf_deit_distilled": tiny_hf_deit,
}
TEXT_FAMILIES = {"open_clip", "open_clip_siglip", "hf_clip", "hf_siglip"}


def wrap_tiny(name: str, module=None):
    """The adapter of a tiny family (the toy tokenizer for the Hugging Face text towers)."""
    import vitlens

    module = module if module is not None else {**TINY_FACTORIES, **VLM_FACTORIES}[name]()
    if name in ("hf_clip", "hf_siglip"):
        return vitlens.wrap_model(module, tokenizer=toy_tokenizer)
    return vitlens.wrap_model(module)


TINY_FACTORIES = {
    "timm_vit": lambda: tiny_timm("vit"),
    "timm_avgpool": lambda: tiny_timm("vit", class_token=False, global_pool="avg"),
    "timm_registers": lambda: tiny_timm("vit", reg_tokens=4),
    "timm_deit_distilled": lambda: tiny_timm("deit_distilled"),
    "torchvision": tiny_torchvision,
    "hf": tiny_hf,
    "open_clip": tiny_open_clip,
}


def tiny_siglip_like():
    """A timm ViT with SigLIP's attentional pooler (global_pool='map') and no class token."""
    return tiny_timm("vit", class_token=False, global_pool="map")


def tiny_swin():
    """A 4-stage Swin on 64x64 inputs: grids 16, 8, 4, 2; stage dims 24, 48, 96, 192."""
    import timm

    return _seeded(lambda: timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=IMG,
                                             window_size=4, embed_dim=24, depths=(1, 1, 2, 1),
                                             num_heads=(1, 2, 2, 4), num_classes=10).eval())


EXTRA_FACTORIES = {"timm_siglip_like": tiny_siglip_like, "timm_swin": tiny_swin}
ALL_FACTORIES = {**TINY_FACTORIES, **VLM_FACTORIES, **EXTRA_FACTORIES}
