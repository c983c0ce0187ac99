"""ImageNet-Segmentation: the gtsegs_ijcv.mat loader on a generated file in that HDF5 layout, and the
pixel accuracy / mIoU / mAP protocol against explicit per-pixel loops and scikit-learn's AP."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import vitlens
from vitlens.data import ImageNetSegmentation
from vitlens.errors import InputError
from vitlens.metrics import average_precision, segmentation, segmentation_scores

from conftest import IMG, tiny_timm, write_mat


def test_loader_reads_generated_mat(tmp_path):
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (30, 40, 3), dtype=np.uint8), rng.integers(0, 255, (50, 20, 3), dtype=np.uint8)]
    masks = [np.zeros((30, 40), np.uint8), np.zeros((50, 20), np.uint8)]
    masks[0][5:20, 10:30] = 1
    masks[1][:25] = 1
    p = tmp_path / "gtsegs_ijcv.mat"
    write_mat(p, images, masks)
    ds = ImageNetSegmentation(p)
    assert len(ds) == 2
    np.testing.assert_array_equal(np.array(ds.image(1)), images[1])
    np.testing.assert_array_equal(ds.mask(0), masks[0])
    a = vitlens.wrap_model(tiny_timm())
    x, m = ds.batch([0, 1], a)
    assert x.shape == (2, 3, IMG, IMG) and m.shape == (2, IMG, IMG)
    # nearest resize of the 50x20 mask: top half object, bottom half background
    assert m[1, : IMG // 2 - 1].eq(1).all() and m[1, IMG // 2 + 1:].eq(0).all()
    ds.close()
    with pytest.raises(InputError, match="not found"):
        ImageNetSegmentation(tmp_path / "missing.mat")


def _slow(maps, masks, thr):
    correct = labeled = 0
    inter, union, aps = np.zeros(2), np.zeros(2), []
    from sklearn.metrics import average_precision_score

    for m, g in zip(maps.numpy().astype(np.float64), masks.numpy()):
        m = (m - m.min()) / (m.max() - m.min()) if m.max() > m.min() else np.zeros_like(m)
        t = m.mean() if thr == "mean" else thr
        pred = (m > t).astype(int)
        valid = g >= 0
        correct += int(((pred == g) & valid).sum())
        labeled += int(valid.sum())
        for c in (0, 1):
            inter[c] += ((pred == c) & (g == c) & valid).sum()
            union[c] += (((pred == c) | (g == c)) & valid).sum()
        scores = np.concatenate([(1 - m)[valid], m[valid]])
        truth = np.concatenate([(g == 0)[valid], (g == 1)[valid]])
        aps.append(average_precision_score(truth, scores))
    return correct / labeled, (inter / union).mean(), float(np.mean(aps)), aps


@pytest.mark.parametrize("thr", ["mean", 0.5])
def test_segmentation_matches_loops(thr):
    pytest.importorskip("sklearn")
    g = torch.Generator().manual_seed(0)
    maps = torch.rand(3, 16, 16, generator=g)
    maps[2] = (maps[2] * 4).round() / 4  # many ties for AP
    masks = (torch.rand(3, 16, 16, generator=g) > 0.6).long()
    masks[1, :3] = -1  # unlabelled rows
    res = segmentation(None, None, maps, masks=masks, threshold=thr)
    acc, miou, mAP, aps = _slow(maps, masks, thr)
    torch.testing.assert_close(res.values, torch.tensor(aps, dtype=torch.float32), atol=1e-6, rtol=1e-5)
    # two batches accumulate to the same dataset numbers
    r1 = segmentation(None, None, maps[:2], masks=masks[:2], threshold=thr)
    r2 = segmentation(None, None, maps[2:], masks=masks[2:], threshold=thr)
    for s in (segmentation_scores(res), segmentation_scores([r1, r2])):
        assert abs(s["pixel_accuracy"] - acc) < 1e-12 and abs(s["miou"] - miou) < 1e-12 and abs(s["map"] - mAP) < 1e-6


def test_average_precision_against_sklearn():
    sk = pytest.importorskip("sklearn.metrics")
    g = torch.Generator().manual_seed(1)
    s = (torch.rand(4, 50, generator=g) * 5).round()
    t = torch.rand(4, 50, generator=g) > 0.5
    ref = torch.tensor([sk.average_precision_score(t[i].numpy(), s[i].numpy()) for i in range(4)])
    torch.testing.assert_close(average_precision(s, t).float(), ref.float(), atol=1e-6, rtol=1e-5)


def test_degenerate_maps():
    masks = torch.zeros(2, 8, 8, dtype=torch.long)
    masks[:, 2:6, 2:6] = 1
    # constant (and all-zero) maps: everything background -> fg IoU 0, pixel accuracy = background share
    for m in (torch.zeros(2, 8, 8), torch.full((2, 8, 8), 3.0)):
        s = segmentation_scores(segmentation(None, None, m, masks=masks))
        assert s["iou"][1] == 0 and abs(s["pixel_accuracy"] - 48 / 64) < 1e-12
    # the mask itself as map: perfect
    s = segmentation_scores(segmentation(None, None, masks.float(), masks=masks, threshold=0.5))
    assert s["pixel_accuracy"] == 1 and s["miou"] == 1 and abs(s["map"] - 1) < 1e-12
    with pytest.raises(InputError, match="shape"):
        segmentation(None, None, torch.zeros(2, 8, 8), masks=torch.zeros(2, 4, 4))
