"""Open-vocabulary p-mIoU on a generated miniature of the OpenImages V7 point-label release."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

import vitlens
from vitlens.data import OpenImagesPoints, transform_boxes, transform_points
from vitlens.errors import InputError
from vitlens.metrics import open_vocab, open_vocab_scores

from conftest import IMG, tiny_open_clip

HEADER = "ImageId,X,Y,Label,EstimatedYesNo,Source,YesVotes,NoVotes,UnsureVotes,TextLabel"


def _mini(tmp_path):
    (tmp_path / "img").mkdir()
    Image.new("RGB", (120, 80), (10, 200, 30)).save(tmp_path / "img" / "aaa.jpg")
    Image.new("RGB", (60, 90), (200, 10, 30)).save(tmp_path / "img" / "bbb.jpg")
    rows = [HEADER,
            "aaa,0.5,0.5,/m/01,yes,cs,3,0,0,", "aaa,0.1,0.1,/m/01,no,cs,0,3,0,", "aaa,0.9,0.2,/m/01,unsure,cs,1,1,1,",
            "aaa,0.01,0.5,/m/01,yes,cs,2,1,0,",  # outside the centre crop of a landscape image
            "aaa,0.3,0.6,/m/02,yes,ih,1,0,0,", "bbb,0.5,0.4,/m/02,no,ih,0,1,0,", "bbb,0.5,0.6,/m/02,yes,ih,2,0,0,",
            "ccc,0.5,0.5,/m/01,yes,cs,1,0,0,"]  # no image: skipped
    (tmp_path / "points.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "classes.csv").write_text("LabelName,DisplayName\n/m/01,Cat\n/m/02,Dog\n")
    return OpenImagesPoints(tmp_path / "points.csv", tmp_path / "img", tmp_path / "classes.csv")


def test_loader_reads_official_format(tmp_path):
    ds = _mini(tmp_path)
    assert [(p.image_id, p.name, len(p.points)) for p in ds.pairs] == [("aaa", "Cat", 3), ("aaa", "Dog", 1),
                                                                       ("bbb", "Dog", 2)]
    assert ds.pairs[0].positive.tolist() == [True, False, True]
    a = vitlens.wrap_model(tiny_open_clip())
    x, prompts, pts, labs = ds.batch([0, 2], a)
    assert prompts == ["a photo of a cat", "a photo of a dog"] and x.shape == (2, 3, IMG, IMG)
    # the two points left of the 64-px centre crop of the 120 x 80 image are dropped, then padding
    assert labs[0].tolist() == [1, -1] and labs[1].tolist() == [0, 1]
    with pytest.raises(InputError, match="not found"):
        OpenImagesPoints(tmp_path / "none.csv", tmp_path / "img", tmp_path / "classes.csv")


def test_points_follow_the_box_transform():
    rel = np.array([[0.25, 0.75], [0.6, 0.1]])
    for size in [(120, 80), (60, 90)]:
        got, inside = transform_points(rel, size, (IMG, IMG), 0.9)
        px = rel * np.array(size)
        for q, ok, p in zip(got, inside, px):  # a point maps like the top-left corner of a 1-px box
            ref = transform_boxes(np.concatenate([p, p + 1])[None], size, (IMG, IMG), 0.9)
            assert ok == (len(ref) == 1 and (q >= 0).all())
            if ok:
                np.testing.assert_allclose(q, ref[0, :2], atol=1e-9)


def test_metric_matches_loop_and_class_mean():
    g = torch.Generator().manual_seed(0)
    maps = torch.rand(3, 16, 16, generator=g)
    pts = torch.rand(3, 5, 2, generator=g) * 16
    labs = torch.randint(-1, 2, (3, 5), generator=g)
    labs[0, :2] = torch.tensor([1, 0])
    classes = ["cat", "dog", "cat"]
    res = open_vocab(None, None, maps, classes, points=pts, point_labels=labs)
    inter, union = {}, {}
    for b in range(3):
        m = maps[b]
        m = (m - m.min()) / (m.max() - m.min())
        i = u = 0
        for (px, py), lb in zip(pts[b].tolist(), labs[b].tolist()):
            if lb < 0:
                continue
            p = float(m[int(math.floor(py)), int(math.floor(px))]) > 0.5
            i += p and lb == 1
            u += p or lb == 1
        assert (math.isnan(float(res.values[b])) and u == 0) or abs(float(res.values[b]) - i / u) < 1e-6
        inter[classes[b]] = inter.get(classes[b], 0) + i
        union[classes[b]] = union.get(classes[b], 0) + u
    ref = np.mean([inter[c] / union[c] for c in inter if union[c]])
    assert abs(open_vocab_scores(res)["p_miou"] - ref) < 1e-12


def test_degenerate_maps():
    pts = torch.tensor([[[1.0, 1.0], [5.0, 5.0]]])
    labs = torch.tensor([[1, 0]])
    zero = open_vocab(None, None, torch.zeros(1, 8, 8), "x", points=pts, point_labels=labs)
    assert zero.values.item() == 0  # nothing predicted, one positive point: IoU 0
    none = open_vocab(None, None, torch.zeros(1, 8, 8), "x", points=pts, point_labels=torch.tensor([[0, 0]]))
    assert math.isnan(none.values.item())
    with pytest.raises(InputError, match="points"):
        open_vocab(None, None, torch.zeros(1, 8, 8), "x", points=pts[0], point_labels=labs)
