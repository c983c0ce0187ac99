"""The comparison figure: one row per method (plus the image row), one column per image, a colour bar."""
from __future__ import annotations

import numpy as np
from PIL import Image

from vitlens.viz import save_grid


def test_grid_has_one_row_per_method_and_a_colour_bar(tmp_path):
    rng = np.random.default_rng(0)
    imgs = [rng.random((32, 32, 3)) for _ in range(2)]
    methods = ["tis", "legrad", "integrated_gradients"]
    maps = {(n, m): rng.random((32, 32)) for n in ("a", "b") for m in methods if (n, m) != ("b", "legrad")}
    p = save_grid(tmp_path / "g.png", imgs, ["a", "b"], methods, maps, cell=2.0, captions={"a": "tabby (p=0.5)"},
                  timings={"tis": 1.5})
    w, h = Image.open(p).size
    dpi, cell, gap, top, label_w, cbar_w = 80, 2.0, 0.08, 0.5, 2.5, 1.0  # save_grid's layout in inches
    assert abs(h - dpi * (top + (len(methods) + 1) * (cell + gap))) <= 1  # image row + one row per method
    assert abs(w - dpi * (label_w + 2 * cell + cbar_w)) <= 1  # label column, one column per image, colour bar
    px = np.asarray(Image.open(p).convert("RGB")).astype(int)
    bar = px[int(dpi * top) + 5: int(dpi * (top + 2 * cell)), int(dpi * (label_w + 2 * cell + 0.32)):
             int(dpi * (label_w + 2 * cell + 0.45))]
    assert bar[..., 2].max() > 100 and bar[..., 0].max() > 100  # the jet colour bar: blue at 0, red at 1
