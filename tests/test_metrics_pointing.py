"""Pointing game (hit, tolerance, energy) against per-pixel loops, and its degenerate cases."""
from __future__ import annotations

import math

import pytest
import torch

from vitlens.errors import InputError
from vitlens.metrics import MetricResult, get_metric, pointing_game, pointing_hits

H = W = 20


def _slow_hit(m, box, tol):
    maxima = [(i, j) for i in range(H) for j in range(W) if m[i, j] == m.max()]
    inside = [(i, j) for i in range(H) for j in range(W) if box[i, j]]
    return float(all(any(math.hypot(i - p, j - q) <= tol for p, q in inside) for i, j in maxima))


def _slow_energy(m, box):
    pos = [max(float(m[i, j]), 0.0) for i in range(H) for j in range(W)]
    inn = [max(float(m[i, j]), 0.0) for i in range(H) for j in range(W) if box[i, j]]
    return sum(inn) / sum(pos) if sum(pos) > 0 else 0.0


def _boxes():
    b = torch.zeros(4, H, W, dtype=torch.bool)
    b[0, 2:6, 3:9] = True
    b[1, 10:14, 10:12] = True
    b[1, 0:3, 15:20] = True
    b[2, 7, 7] = True          # single-pixel box
    b[3, 0:9, 0:9] = True
    return b


@pytest.mark.parametrize("tol", [0.0, 2.0, 3.5])
def test_hits_match_loop(tol):
    g = torch.Generator().manual_seed(0)
    maps = torch.rand(4, H, W, generator=g)
    maps[0, 4, 5] = 2.0            # inside
    maps[1, 9, 9] = 2.0            # just outside (diagonal to the box corner)
    maps[2, 7, 9] = 2.0            # two pixels from the single-pixel box
    maps[3, 12, 12] = 2.0
    maps[3, 3, 3] = 2.0            # tie: one maximum inside, one outside
    boxes = _boxes()
    res = pointing_game(None, None, maps, boxes=boxes, tolerance=tol, max_box_fraction=None)
    assert isinstance(res, MetricResult)
    ref = torch.tensor([_slow_hit(maps[b], boxes[b], tol) for b in range(4)])
    torch.testing.assert_close(res.values, ref)
    assert res.values[0] == 1 and res.values[3] == 0


def test_energy_matches_loop():
    g = torch.Generator().manual_seed(1)
    maps = torch.randn(4, H, W, generator=g)
    boxes = _boxes()
    res = pointing_game(None, None, maps, boxes=boxes, variant="energy", max_box_fraction=None)
    ref = torch.tensor([_slow_energy(maps[b], boxes[b]) for b in range(4)])
    torch.testing.assert_close(res.values, ref, atol=1e-6, rtol=1e-5)


def test_degenerate_maps_and_boxes():
    boxes = _boxes()
    # constant and all-zero maps: ties everywhere -> never a hit; all-zero energy is 0
    for m in (torch.zeros(4, H, W), torch.full((4, H, W), 0.7)):
        r = pointing_game(None, None, m, boxes=boxes, max_box_fraction=None)
        assert (r.values == 0).all()
    e = pointing_game(None, None, torch.zeros(4, H, W), boxes=boxes, variant="energy", max_box_fraction=None)
    assert (e.values == 0).all()
    # single-pixel box: hit exactly when the maximum is that pixel
    m = torch.zeros(1, H, W)
    m[0, 7, 7] = 1
    assert pointing_game(None, None, m, boxes=boxes[2:3]).values.item() == 1
    m[0, 7, 8] = 1
    assert pointing_game(None, None, m, boxes=boxes[2:3]).values.item() == 0
    # whole-image box: excluded by the > 0.5 coverage rule; without the rule even a constant map hits
    whole = torch.ones(1, H, W, dtype=torch.bool)
    assert math.isnan(pointing_game(None, None, torch.zeros(1, H, W), boxes=whole).values.item())
    assert pointing_game(None, None, torch.zeros(1, H, W), boxes=whole, max_box_fraction=None).values.item() == 1
    # no box at all: excluded
    assert math.isnan(pointing_game(None, None, m, boxes=torch.zeros(1, H, W, dtype=torch.bool)).values.item())


def test_exclusion_uses_exact_coverage_when_given():
    boxes = torch.zeros(2, H, W, dtype=torch.bool)
    boxes[:, :10, :] = True        # 0.5 of the pixels
    maps = torch.zeros(2, H, W)
    maps[:, 0, 0] = 1
    r = pointing_game(None, None, maps, boxes=boxes)
    assert (r.values == 1).all()
    r = pointing_game(None, None, maps, boxes=boxes, coverage=torch.tensor([0.49, 0.51]))
    assert r.values[0] == 1 and math.isnan(r.values[1])
    torch.testing.assert_close(r.values, pointing_hits(maps, boxes, coverage=torch.tensor([0.49, 0.51])),
                               equal_nan=True)


def test_registry_and_errors():
    info = get_metric("pointing_game")
    assert info.needs == ("boxes",) and info.higher_is_better and info.defaults["tolerance"] == 0.0
    with pytest.raises(InputError, match="shape"):
        pointing_game(None, None, torch.zeros(2, H, W), boxes=torch.zeros(2, H, W + 1, dtype=torch.bool))
    with pytest.raises(InputError, match="variant"):
        pointing_game(None, None, torch.zeros(2, H, W), boxes=torch.zeros(2, H, W, dtype=torch.bool), variant="x")


def test_shared_images_reproduce_readme(real_model, shared_pointing):
    """200 images are kept; the centre pixel hits 0.60 of them (../shared/README.md)."""
    ds, keep, masks, cov = shared_pointing
    assert len(keep) == 200
    maps = torch.zeros(len(keep), *real_model.input_size)
    maps[:, real_model.input_size[0] // 2, real_model.input_size[1] // 2] = 1
    r = pointing_game(real_model, None, maps, boxes=masks, coverage=cov)
    assert abs(r.mean() - 0.60) < 0.005


# ------------------------------------------------------------------------------------ grid pointing game
def test_grid_score_matches_loop():
    from vitlens.metrics import grid_pointing_game

    g = torch.Generator().manual_seed(2)
    maps = torch.randn(3, 10, 14, generator=g)
    cells = torch.tensor([0, 3, 1])
    res = grid_pointing_game(None, None, maps, cells=cells)
    for b in range(3):
        r, c = divmod(int(cells[b]), 2)
        tot = inn = 0.0
        for i in range(10):
            for j in range(14):
                v = max(float(maps[b, i, j]), 0.0)
                tot += v
                if (i >= 5) == bool(r) and (j >= 7) == bool(c):
                    inn += v
        assert abs(float(res.values[b]) - inn / tot) < 1e-6
    flat = grid_pointing_game(None, None, torch.ones(1, 10, 14), cells=[2]).values
    zero = grid_pointing_game(None, None, torch.zeros(1, 10, 14), cells=[2]).values
    assert abs(float(flat) - 0.25) < 1e-7 and float(zero) == 0.0
    with pytest.raises(InputError, match="cells"):
        grid_pointing_game(None, None, maps, cells=[0, 4, 1])


def test_make_grids_places_images_in_cells():
    import vitlens
    from vitlens.metrics import make_grids

    from conftest import IMG, tiny_timm

    a = vitlens.wrap_model(tiny_timm())
    x = torch.randn(12, 3, IMG, IMG, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        pred = a.forward(x).argmax(-1)
    grids, classes, src = make_grids(a, x, pred.tolist(), min_confidence=0.0)
    assert grids.shape[1:] == (3, IMG, IMG)
    for g in range(len(grids)):
        assert len(set(classes[g].tolist())) == 4
        assert torch.equal(classes[g], pred[src[g]])
        small = torch.nn.functional.interpolate(x[src[g, 3]][None], size=(IMG // 2, IMG // 2), mode="bilinear",
                                                antialias=True, align_corners=False)[0]
        torch.testing.assert_close(grids[g, :, IMG // 2:, IMG // 2:], small)
    with pytest.raises(InputError, match="confidently"):
        make_grids(a, x, pred.tolist(), min_confidence=1.01)
