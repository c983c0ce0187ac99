"""Helpers for the benchmark scripts: the shared ViT-Ti and the 200 pointing-game images."""
from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("VITLENS_SHARED", REPO.parent / "shared"))
MODEL = "vit_tiny_patch16_224.augreg_in21k_ft_in1k"


def shared_model(device=None):
    import vitlens

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return vitlens.load_model(MODEL, weights=str(SHARED / "models"), device=device)


def pointing_subset(model, max_box_fraction: float = 0.5):
    """(dataset, indices of images whose boxes cover at most half of the crop, masks, coverage)."""
    from vitlens.data import ImageNetBoxes

    ds = ImageNetBoxes(SHARED / "data" / "imagenet-val-sample")
    idx = list(range(len(ds)))
    cov = ds.box_coverage(idx, model.input_size, model.crop_pct)
    keep = [i for i in idx if cov[i] <= max_box_fraction]
    masks = ds.box_masks(keep, model.input_size, model.crop_pct)
    return ds, keep, masks, cov[keep]
