"""The figures of ``report.html`` (base64 PNGs): example images x method heatmaps and the mean curves.

Examples: images explained by every method entry, first in image order, titled with their class names,
with the ground-truth boxes and each map's maximum (the pixel the pointing game reads) drawn on them.
Curves: the mean insertion/deletion curve (any metric with curves) of each method entry, per column.
"""
from __future__ import annotations

import base64
import io
import json
import sqlite3
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .schema import read_meta
from .store import decode_f32, decode_map
from .tables import Table


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _example_image(path: str, info: dict) -> Optional[np.ndarray]:
    try:
        from ..models.preprocess import eval_transform, load_image

        tf = eval_transform(tuple(info["input_size"]), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), info["crop_pct"],
                            info.get("interpolation", "bicubic"))
        return tf(load_image(path)).permute(1, 2, 0).clamp(0, 1).numpy()
    except Exception:
        return None


def _example_boxes(con: sqlite3.Connection, ids: Sequence[str], info: dict) -> dict:
    """image_id -> (n, 4) ground-truth boxes on the input grid, from the run's data folder (if readable)."""
    cfg = read_meta(con, "config") or {}
    root = cfg.get("data")
    if not root or not (Path(root) / "LOC_val_solution.csv").exists():
        return {}
    try:
        from ..data import ImageNetBoxes

        ds = ImageNetBoxes(root)
        where = {s.image_id: i for i, s in enumerate(ds.samples)}
        out = {}
        for iid in ids:
            if iid in where:
                try:
                    out[iid] = ds.input_boxes(where[iid], tuple(info["input_size"]), info["crop_pct"])
                except Exception:
                    pass
        return out
    except Exception:
        return {}


def class_name(names: Optional[list], index: Optional[int]) -> str:
    """The class's first description (``LOC_synset_mapping.txt``), else ``class <index>``."""
    if index is None or index < 0:
        return "?"
    if names and index < len(names):
        return names[index].split(",")[0].strip()
    return f"class {index}"


def examples_figure(con: sqlite3.Connection, t: Table, n: int) -> Optional[str]:
    """Example images x methods: class names, ground-truth boxes (green) and each map's maximum.

    The cross marks the first maximum of the stored map in raster order (the pixel the pointing game
    reads; with several maxima the game needs all of them inside a box): green for a stored pointing-game
    hit, red for a miss, white where the image has no pointing-game row (excluded or not evaluated)."""
    if n <= 0 or not t.rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    keys = list(t.row_keys.values())
    q = ("SELECT image_id FROM maps WHERE run_key IN (%s) GROUP BY image_id HAVING COUNT(DISTINCT run_key)=? "
         "ORDER BY image_id LIMIT ?" % ",".join("?" * len(keys)))
    ids = [r[0] for r in con.execute(q, (*keys, len(keys), n))]
    if not ids:
        return None
    info = json.loads(con.execute("SELECT model_info FROM runs WHERE run_key=?", (keys[0],)).fetchone()[0])
    paths = dict(con.execute("SELECT image_id, path FROM images"))
    labels = {r[0]: (r[1], r[2]) for r in con.execute("SELECT image_id, label, synset FROM images")}
    names = read_meta(con, "class_names")
    boxes = _example_boxes(con, ids, info)
    hits = {(r[0], r[1]): r[2] for r in con.execute("SELECT run_key, image_id, value FROM results "
                                                    "WHERE metric='pointing_game'")}
    # images x methods; with many methods, methods become the rows so the panels stay readable
    transpose = len(t.rows) > 8
    n_m = 1 + len(t.rows)
    shape_grid = (n_m, len(ids)) if transpose else (len(ids), n_m)
    fig, axes = plt.subplots(*shape_grid, figsize=(2.2 * shape_grid[1] + (1.6 if transpose else 0),
                                                   2.45 * shape_grid[0]), squeeze=False)

    def cell(i: int, j: int):
        return axes[j, i] if transpose else axes[i, j]

    def draw_boxes(ax, iid):
        for x0, y0, x1, y1 in boxes.get(iid, []):
            ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, edgecolor="lime", lw=1.3))

    for i, iid in enumerate(ids):
        img = _example_image(paths.get(iid, ""), info)
        label, synset = labels.get(iid, (-1, ""))
        ax = cell(i, 0)
        if img is not None:
            ax.imshow(img)
        draw_boxes(ax, iid)
        gt = class_name(names, label) if label is not None and label >= 0 else (synset or "no label")
        ax.set_title(f"{iid.replace('ILSVRC2012_', '')[-24:]}\n{gt}", fontsize=8)
        for j, r in enumerate(t.rows):
            blob, shape, target = con.execute("SELECT map, shape, target FROM maps WHERE run_key=? AND image_id=?",
                                              (t.row_keys[r], iid)).fetchone()
            m = decode_map(blob, shape)
            ax = cell(i, j + 1)
            if img is not None and img.shape[:2] == m.shape:
                ax.imshow(img)
                ax.imshow(m, cmap="jet", alpha=0.5, vmin=0, vmax=1)
            else:
                ax.imshow(m, cmap="jet", vmin=0, vmax=1)
            draw_boxes(ax, iid)
            py, px = np.unravel_index(int(np.argmax(m)), m.shape)
            hv = hits.get((t.row_keys[r], iid))
            colour = "white" if hv is None else ("lime" if hv == 1 else "red")
            ax.plot([px], [py], marker="X", markersize=9, color=colour, markeredgecolor="black", markeredgewidth=1,
                    clip_on=False)
            title = r if (i == 0 and not transpose) else ""
            if target is not None and label is not None and int(target) != int(label):
                title = (title + "\n" if title else "") + f"explains: {class_name(names, int(target))}"
            if title:
                ax.set_title(title, fontsize=8)
            if transpose and i == 0:
                ax.text(-0.08, 0.5, r, fontsize=9, ha="right", va="center", transform=ax.transAxes)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
        for sp in ax.spines.values():
            sp.set_visible(False)
    fig.tight_layout()
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    cb = fig.colorbar(ScalarMappable(Normalize(0, 1), cmap="jet"), ax=axes.ravel().tolist(), shrink=0.5,
                      fraction=0.02, pad=0.01)
    cb.set_label("saliency (each map min-max normalised)", fontsize=8)
    return _png(fig)


def curves_figure(con: sqlite3.Connection, t: Table) -> Optional[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []
    for c in t.cols:
        series = []
        for r in t.rows:
            curves, xs = [], None
            for blob, xblob in con.execute("SELECT curve, xs FROM results WHERE run_key=? AND protocol_key=? "
                                           "AND curve IS NOT NULL AND xs IS NOT NULL",
                                           (t.row_keys[r], t.col_keys[c])):
                curves.append(decode_f32(blob))
                xs = decode_f32(xblob) if xblob is not None else xs
            if curves and len({len(v) for v in curves}) == 1:
                mean = np.mean(np.stack(curves), 0)
                series.append((r, np.linspace(0, 1, len(mean)) if xs is None or len(xs) != len(mean) else xs, mean))
        if series:
            panels.append((c, series))
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(5.6 * len(panels), 4.2), squeeze=False)
    colours = plt.get_cmap("tab20")
    for ax, (c, series) in zip(axes[0], panels):
        for k, (r, xs, mean) in enumerate(series):
            auc = float(np.sum((mean[1:] + mean[:-1]) / 2 * np.diff(xs)))
            ax.plot(xs, mean, label=f"{r} (AUC {auc:.3f})", color=colours(k % 20),
                    linestyle="-" if k < 20 else "--")
        ax.set_title(f"mean {c} curve")
        ax.set_xlabel("fraction of pixels")
        ax.set_ylabel("score")
        ax.grid(alpha=0.3)
        if len(series) > 6:
            ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.3), ncol=2, frameon=False)
        else:
            ax.legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)
