"""Shared fixtures: tiny randomly initialised models of every supported family, and the real
ViT-Ti + images from ../shared for integration tests."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from tiny_models import (  # noqa: F401
    ALL_FACTORIES,
    HF_TEXT,
    HF_VISION,
    IMG,
    TEXT_FAMILIES,
    TINY_FACTORIES,
    VLM_FACTORIES,
    _register_tiny_siglip_trunk,
    tiny_hf,
    tiny_hf_clip,
    tiny_hf_deit,
    tiny_hf_siglip,
    tiny_open_clip,
    tiny_open_clip_siglip,
    tiny_siglip_like,
    tiny_swin,
    tiny_timm,
    tiny_torchvision,
    toy_tokenizer,
    wrap_tiny,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VITLENS_NO_PROGRESS", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("VITLENS_SHARED", REPO.parent / "shared"))
REAL_MODEL = "vit_tiny_patch16_224.augreg_in21k_ft_in1k"


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
