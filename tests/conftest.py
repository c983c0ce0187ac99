"""Shared fixtures: tiny randomly initialised models of every supported family, and the real
ViT-Ti + images from ../shared for integration tests."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VITLENS_NO_PROGRESS", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("VITLENS_SHARED", REPO.parent / "shared"))
REAL_MODEL = "vit_tiny_patch16_224.augreg_in21k_ft_in1k"
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


@pytest.fixture(params=sorted(TINY_FACTORIES))
def tiny_family(request):
    """(family name, adapter) for each tiny model family."""
    import vitlens

    return request.param, vitlens.wrap_model(TINY_FACTORIES[request.param]())


@pytest.fixture
def tiny_vit():
    import vitlens

    return vitlens.wrap_model(tiny_timm("vit"))


@pytest.fixture
def tiny_clip():
    import vitlens

    return vitlens.wrap_model(tiny_open_clip())


@pytest.fixture
def images():
    """A fixed (2, 3, 64, 64) batch."""
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 3, IMG, IMG, generator=g)


def _shared_ready() -> bool:
    return (SHARED / "models").is_dir() and (SHARED / "data" / "imagenet-val-sample").is_dir()


@pytest.fixture(scope="session")
def real_model():
    if not _shared_ready():
        pytest.skip(f"../shared not found at {SHARED}: integration tests need the real ViT-Ti")
    import vitlens

    return vitlens.load_model(REAL_MODEL, weights=str(SHARED / "models"))


@pytest.fixture(scope="session")
def shared_pointing(real_model):
    """(dataset, kept indices, box masks, coverage) for the images whose boxes cover <= half the crop."""
    from vitlens.data import ImageNetBoxes

    ds = ImageNetBoxes(SHARED / "data" / "imagenet-val-sample")
    idx = list(range(len(ds)))
    cov = ds.box_coverage(idx, real_model.input_size, real_model.crop_pct)
    keep = [i for i in idx if cov[i] <= 0.5]
    return ds, keep, ds.box_masks(keep, real_model.input_size, real_model.crop_pct), cov[keep]


def close_to_scale(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-4, **kw) -> None:
    """``assert_close`` with an absolute tolerance relative to the scale of ``expected``: ``rtol * max|expected|``.

    Use it where the two sides are the same maths computed in a different float32 order (batched vs one at a
    time, fused vs explicit attention, a GEMM of another batch shape): the rounding error of a float32
    reduction is bounded relative to the magnitude of the terms, not to each (possibly ~0) element, so a
    purely elementwise ``rtol`` (or an absolute ``atol`` that ignores the scale) is not the bound the maths gives.
    ``rtol=1e-4`` leaves >= 10x margin over float32 error (~1e-6 relative) through the tiny models, while any
    wrong equation moves the values by a few per cent of their scale. An all-zero reference tests nothing.
    """
    scale = float(expected.detach().abs().max())
    assert scale > 0, "degenerate reference: an all-zero tensor tests nothing"
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * scale, **kw)


def kill_when_rows_appear(proc, db, timeout: float = 240.0, poll: float = 0.02):
    """SIGKILL the bench process ``proc`` as soon as its database ``db`` holds a committed result row;
    returns that row count (None if the run ended or the timeout passed first)."""
    import os
    import signal
    import sqlite3
    import time

    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if db.exists():
            try:
                con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1)
                n = con.execute("SELECT COUNT(*) FROM results").fetchone()[0]
                con.close()
            except sqlite3.Error:
                n = 0
            if n > 0:
                os.kill(proc.pid, signal.SIGKILL)
                return n
        time.sleep(poll)
    return None


def write_mat(path, images, masks) -> None:
    """gtsegs_ijcv.mat as MATLAB v7.3 writes it (HDF5): /value/img and /value/gt hold object references,
    images stored (3, W, H), masks behind one more (1, 1) reference, stored (W, H)."""
    import h5py

    with h5py.File(path, "w") as f:
        ri = np.empty((len(images), 1), dtype=h5py.ref_dtype)
        rg = np.empty((len(images), 1), dtype=h5py.ref_dtype)
        for i, (im, m) in enumerate(zip(images, masks)):
            d = f.create_dataset(f"#refs#/i{i}", data=im.transpose(2, 1, 0))
            g = f.create_dataset(f"#refs#/g{i}", data=m.T)
            inner = f.create_dataset(f"#refs#/r{i}", data=np.array([[g.ref]], dtype=h5py.ref_dtype))
            ri[i, 0], rg[i, 0] = d.ref, inner.ref
        f.create_dataset("value/img", data=ri)
        f.create_dataset("value/gt", data=rg)
