"""Reports of a benchmark folder: ``results.md``, ``results.csv`` and a self-contained ``report.html``.

Statistics: per (method entry, metric protocol) the mean over images with a finite value (images a
protocol excludes, e.g. pointing-game images with large boxes, are NaN and left out; ``n`` counts the
rest) and the 95 % confidence interval of the mean from Student's t distribution,
``mean +/- t_{0.975, n-1} * s / sqrt(n)`` (``s`` the sample standard deviation; no interval for n < 2).
The best mean of each column (highest or lowest, by the metric's direction) is in bold.

``report.html`` embeds everything as base64 PNGs (no external files): the table, a grid of example
images x method heatmaps (images explained by every method, first in image order), and the mean
insertion/deletion curves (any metric with curves) per method.
"""
from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
import sqlite3
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..errors import InputError
from .store import connect, decode_f32, decode_map, merge_into

MAIN_DB = "results.sqlite"


@dataclass
class Cell:
    n: int
    mean: float
    lo: float
    hi: float

    @property
    def half(self) -> float:
        return (self.hi - self.lo) / 2


def mean_ci(values: Sequence[float], level: float = 0.95) -> Cell:
    """Mean and Student-t confidence interval of the finite ``values``."""
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=np.float64)
    n = len(v)
    if n == 0:
        return Cell(0, float("nan"), float("nan"), float("nan"))
    m = float(v.mean())
    if n < 2:
        return Cell(n, m, float("nan"), float("nan"))
    from scipy import stats

    h = float(stats.t.ppf(0.5 + level / 2, n - 1) * v.std(ddof=1) / math.sqrt(n))
    return Cell(n, m, m - h, m + h)


@dataclass
class Table:
    rows: list            # row labels (method entries)
    cols: list            # column labels (metrics)
    cells: dict           # (row, col) -> Cell
    better: dict          # col -> True (higher is better) / False
    row_keys: dict        # row label -> run_key
    col_keys: dict        # col label -> protocol_key
    models: list

    def best(self, col: str) -> set:
        """Rows with the best mean of ``col`` (all of them when tied)."""
        vals = {r: self.cells[(r, col)].mean for r in self.rows
                if (r, col) in self.cells and math.isfinite(self.cells[(r, col)].mean)}
        if not vals:
            return set()
        b = (max if self.better[col] else min)(vals.values())
        return {r for r, v in vals.items() if v == b}


def merge_shards(out: Path, remove: bool = False) -> int:
    """Merge ``out/shards/*.sqlite`` into ``out/results.sqlite``. Shard files are kept unless ``remove``
    (only safe when no process still writes to them, e.g. after the torchrun barrier)."""
    shards = sorted((Path(out) / "shards").glob("results.shard-*.sqlite"))
    return merge_into(Path(out) / MAIN_DB, shards, remove=remove) if shards else 0


def _fmt(v: float, digits: int = 3) -> str:
    """Fixed 3 decimals, or 3 significant digits for values below 0.01 (e.g. probabilities of random models)."""
    if not math.isfinite(v):
        return "nan"
    return f"{v:.{digits}f}" if v == 0 or abs(v) >= 0.01 else f"{v:.{digits - 1}e}"


def build_table(con: sqlite3.Connection, run_keys: Optional[Sequence[str]] = None,
                protocol_keys: Optional[Sequence[str]] = None) -> Table:
    runs = {r[0]: dict(label=r[1], model=r[2], method=r[3], params=r[4]) for r in
            con.execute("SELECT run_key, label, model, method, method_params FROM runs")}
    protos = {r[0]: dict(metric=r[1], protocol=r[2], hib=bool(r[3])) for r in
              con.execute("SELECT protocol_key, metric, protocol, higher_is_better FROM protocols")}
    if run_keys is not None:
        runs = {k: v for k, v in runs.items() if k in set(run_keys)}
    if protocol_keys is not None:
        protos = {k: v for k, v in protos.items() if k in set(protocol_keys)}
    # labels: disambiguate entries that share a label (other parameters or models) with a key suffix
    models = sorted({v["model"] for v in runs.values()})
    by_label = defaultdict(list)
    for k, v in runs.items():
        base = v["label"] if len(models) == 1 else f"{v['model']} / {v['label']}"
        by_label[base].append(k)
    row_keys = {}
    for base, keys in by_label.items():
        for k in keys:
            row_keys[base if len(keys) == 1 else f"{base} [{k[:6]}]"] = k
    by_metric = defaultdict(list)
    for k, v in protos.items():
        by_metric[v["metric"]].append(k)
    col_keys = {}
    for metric, keys in by_metric.items():
        for k in keys:
            col_keys[metric if len(keys) == 1 else f"{metric} [{k[:6]}]"] = k
    values = defaultdict(list)
    for rk, pk, v in con.execute("SELECT run_key, protocol_key, value FROM results"):
        values[(rk, pk)].append(float("nan") if v is None else v)
    cells = {}
    for r, rk in row_keys.items():
        for c, pk in col_keys.items():
            if (rk, pk) in values:
                cells[(r, c)] = mean_ci(values[(rk, pk)])
    rows = [r for r in sorted(row_keys) if any((r, c) in cells for c in col_keys)]
    cols = [c for c in sorted(col_keys) if any((r, c) in cells for r in rows)]
    return Table(rows, cols, cells, {c: protos[col_keys[c]]["hib"] for c in cols},
                 {r: row_keys[r] for r in rows}, {c: col_keys[c] for c in cols}, models)


def table_markdown(t: Table) -> str:
    head = "| method | " + " | ".join(f"{c} {'↑' if t.better[c] else '↓'}" for c in t.cols) + " |"
    lines = [head, "|" + "---|" * (len(t.cols) + 1)]
    for r in t.rows:
        cells = []
        for c in t.cols:
            cell = t.cells.get((r, c))
            if cell is None:
                cells.append("–")
                continue
            s = _fmt(cell.mean) + ("" if not math.isfinite(cell.half) else f" ± {_fmt(cell.half)}")
            cells.append(f"**{s}**" if r in t.best(c) else s)
        lines.append(f"| {r} | " + " | ".join(cells) + " |")
    ns = sorted({cell.n for cell in t.cells.values()})
    lines.append("")
    lines.append(f"Mean ± 95 % CI (Student t) over images; n = {', '.join(map(str, ns))} images per cell "
                 f"(NaN-excluded images left out). ↑ higher is better, ↓ lower is better; best in bold. "
                 f"Model: {', '.join(t.models)}.")
    return "\n".join(lines) + "\n"


def write_csv(t: Table, path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", "metric", "run_key", "protocol_key", "n", "mean", "ci95_low", "ci95_high",
                    "ci95_halfwidth", "higher_is_better", "best"])
        for r in t.rows:
            for c in t.cols:
                cell = t.cells.get((r, c))
                if cell is None:
                    continue
                w.writerow([r, c, t.row_keys[r], t.col_keys[c], cell.n, cell.mean, cell.lo, cell.hi, cell.half,
                            int(t.better[c]), int(r in t.best(c))])


# ---------------------------------------------------------------------------------------------- html
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


def examples_figure(con: sqlite3.Connection, t: Table, n: int) -> Optional[str]:
    if n <= 0 or not t.rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(t.row_keys.values())
    q = ("SELECT image_id FROM maps WHERE run_key IN (%s) GROUP BY image_id HAVING COUNT(DISTINCT run_key)=? "
         "ORDER BY image_id LIMIT ?" % ",".join("?" * len(keys)))
    ids = [r[0] for r in con.execute(q, (*keys, len(keys), n))]
    if not ids:
        return None
    info = json.loads(con.execute("SELECT model_info FROM runs WHERE run_key=?", (keys[0],)).fetchone()[0])
    paths = dict(con.execute("SELECT image_id, path FROM images"))
    labels = dict(con.execute("SELECT image_id, synset FROM images"))
    # images x methods; with many methods, methods become the rows so the panels stay readable
    transpose = len(t.rows) > 8
    n_m = 1 + len(t.rows)
    shape_grid = (n_m, len(ids)) if transpose else (len(ids), n_m)
    fig, axes = plt.subplots(*shape_grid, figsize=(1.9 * shape_grid[1] + (1.6 if transpose else 0),
                                                   1.9 * shape_grid[0]), squeeze=False)

    def cell(i: int, j: int):
        return axes[j, i] if transpose else axes[i, j]

    for i, iid in enumerate(ids):
        img = _example_image(paths.get(iid, ""), info)
        ax = cell(i, 0)
        if img is not None:
            ax.imshow(img)
        ax.set_title(f"{iid[-8:]} {labels.get(iid, '')}", fontsize=7)
        for j, r in enumerate(t.rows):
            blob, shape = con.execute("SELECT map, shape FROM maps WHERE run_key=? AND image_id=?",
                                      (t.row_keys[r], iid)).fetchone()
            m = decode_map(blob, shape)
            ax = cell(i, j + 1)
            if img is not None and img.shape[:2] == m.shape:
                ax.imshow(img)
                ax.imshow(m, cmap="jet", alpha=0.5, vmin=0, vmax=1)
            else:
                ax.imshow(m, cmap="jet", vmin=0, vmax=1)
            if transpose and i == 0:
                ax.text(-0.08, 0.5, r, fontsize=9, ha="right", va="center", transform=ax.transAxes)
            elif not transpose and i == 0:
                ax.set_title(r, fontsize=8)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
        for sp in ax.spines.values():
            sp.set_visible(False)
    fig.tight_layout()
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
                                           "AND curve IS NOT NULL AND xs IS NOT NULL",  # no xs: counts, not curves
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


def table_html(t: Table) -> str:
    th = "".join(f"<th>{html.escape(c)} {'↑' if t.better[c] else '↓'}</th>" for c in t.cols)
    body = []
    for r in t.rows:
        tds = []
        for c in t.cols:
            cell = t.cells.get((r, c))
            if cell is None:
                tds.append("<td>–</td>")
                continue
            s = _fmt(cell.mean) + ("" if not math.isfinite(cell.half) else f" ± {_fmt(cell.half)}")
            s = f"<b>{s}</b>" if r in t.best(c) else s
            tds.append(f"<td title='n={cell.n}'>{s}</td>")
        body.append(f"<tr><th>{html.escape(r)}</th>{''.join(tds)}</tr>")
    return f"<table><tr><th>method</th>{th}</tr>{''.join(body)}</table>"


def write_report(out, run_keys: Optional[Sequence[str]] = None, protocol_keys: Optional[Sequence[str]] = None,
                 examples: int = 4) -> dict:
    """Merge any shard files (kept on disk), then write ``results.md``, ``results.csv`` and ``report.html`` in ``out``."""
    out = Path(out)
    db = out / MAIN_DB
    if not db.exists() and not (out / "shards").is_dir():
        raise InputError(f"no benchmark results in {out} (expected {db}).")
    merge_shards(out)
    con = connect(db)
    try:
        t = build_table(con, run_keys, protocol_keys)
        if not t.rows:
            raise InputError(f"{db} holds no result rows yet.")
        from .datasets import dataset_scores_markdown

        pooled = dataset_scores_markdown(con, t)  # mIoU, pixel accuracy, p-mIoU: pooled over the dataset
        md = table_markdown(t) + pooled
        version = con.execute("SELECT value FROM meta WHERE key='version'").fetchone()
        n_rows = con.execute("SELECT COUNT(*) FROM results").fetchone()[0]
        (out / "results.md").write_text(f"# vitlens benchmark results\n\n{md}")
        write_csv(t, out / "results.csv")
        ex = examples_figure(con, t, examples)
        cu = curves_figure(con, t)
        parts = [
            "<!doctype html><html><head><meta charset='utf-8'><title>vitlens benchmark report</title>",
            "<style>body{font-family:sans-serif;margin:24px;max-width:1150px}table{border-collapse:collapse}"
            "td,th{border:1px solid #bbb;padding:4px 10px;text-align:right}th{background:#f2f2f2}"
            "img{max-width:100%}p.note{color:#555;font-size:90%}</style></head><body>",
            "<h1>vitlens benchmark report</h1>",
            f"<p class='note'>{html.escape(', '.join(t.models))} · {n_rows} result rows · code "
            f"{html.escape(json.loads(version[0]) if version else '?')}</p>",
            "<h2>Results</h2>", table_html(t), *([f"<pre>{html.escape(pooled)}</pre>"] if pooled else []),
            "<p class='note'>Mean ± 95 % confidence interval (Student t) over images; best value in bold; "
            "↑ higher is better, ↓ lower is better. Hover a cell for its number of images.</p>",
        ]
        if cu:
            parts += ["<h2>Mean curves</h2>", f"<img alt='curves' src='data:image/png;base64,{cu}'>"]
        if ex:
            parts += ["<h2>Examples</h2>", f"<img alt='examples' src='data:image/png;base64,{ex}'>"]
        parts.append("</body></html>")
        (out / "report.html").write_text("\n".join(parts))
    finally:
        con.close()
    return dict(markdown=str(out / "results.md"), csv=str(out / "results.csv"), html=str(out / "report.html"),
                table=md)
