"""Reports of a benchmark folder: ``results.md``, ``results.csv`` and a self-contained ``report.html``.

What they show: every (method entry, metric protocol) pair in the folder's database (all runs, not only
the last one; a run's own view is written to ``OUT/this-run/`` only when asked, ``--report-subset``).

Statistics: per (method entry, metric protocol) the mean over images with a finite value (images a
protocol excludes, e.g. pointing-game images with large boxes, are NaN and left out; ``n`` counts the
rest) and a 95 % interval that stays inside the metric's range (:func:`value_range`):

* **binary** values (pointing-game hits, 0/1): the Wilson score interval of the proportion
  ``p = k / n`` (Wilson 1927; Brown, Cai & DasGupta 2001, eq. 4)::

      (p + z^2/2n -/+ z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n),   z = 1.959964

* **bounded** values (AUCs of probabilities, Gini, shares in [0, 1], ...): Student's t interval
  ``mean +/- t_{0.975, n-1} s / sqrt(n)`` clipped to the range, labelled "t, clipped to [lo, hi]";
* **unbounded** values (e.g. AUCs of logits): the plain Student-t interval.

No interval for n < 2 (t) or n = 0. The best mean of each column (by the metric's direction) is in bold.
Cells print ``mean [lo, hi]``. A "Protocol" section lists every metric's full protocol (and its
definition), every method entry's parameters, the target rule, seed, model, weights and code version;
an "Errors" section lists the images, methods and metrics that failed (``errors`` rows of the store).

``report.html`` embeds everything as base64 PNGs (no external files): the table, the mean
insertion/deletion curves (any metric with curves) per method, and example images x method heatmaps
(images explained by every method, first in image order) titled with their class names, with the
ground-truth boxes and the map's maximum (the pixel the pointing game reads) drawn on them.
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
from .store import connect, decode_f32, decode_map, merge_into, resolve_errors

MAIN_DB = "results.sqlite"


Z95 = 1.959963984540054  # standard normal 0.975 quantile


@dataclass
class Cell:
    n: int
    mean: float
    lo: float
    hi: float
    kind: str = "t"  # "wilson" | "t" | "t-clipped"

    @property
    def half(self) -> float:
        return (self.hi - self.lo) / 2


def _finite(values: Sequence[float]) -> np.ndarray:
    return np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=np.float64)


def mean_ci(values: Sequence[float], level: float = 0.95) -> Cell:
    """Mean and Student-t confidence interval of the finite ``values``."""
    v = _finite(values)
    n = len(v)
    if n == 0:
        return Cell(0, float("nan"), float("nan"), float("nan"))
    m = float(v.mean())
    if n < 2:
        return Cell(n, m, float("nan"), float("nan"))
    from scipy import stats

    h = float(stats.t.ppf(0.5 + level / 2, n - 1) * v.std(ddof=1) / math.sqrt(n))
    return Cell(n, m, m - h, m + h)


def wilson(k: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion k / n (see the module docstring); inside [0, 1]."""
    if n == 0:
        return float("nan"), float("nan")
    p = k / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    # k = 0 (k = n): the lower (upper) end point is exactly 0 (1); the closed form can be 1 ulp off
    lo = 0.0 if k <= 0 else max(0.0, centre - half)
    hi = 1.0 if k >= n else min(1.0, centre + half)
    return lo, hi


def value_range(metric: str, protocol: dict) -> tuple[Optional[float], Optional[float], bool]:
    """(low, high, binary) of a metric's per-image values under ``protocol`` (None: unbounded).

    From the metrics' definitions: pointing-game hits are 0/1 (energy variant: a share in [0, 1]);
    insertion/deletion AUCs of softmax probabilities over x in [0, 1] lie in [0, 1] (of logits:
    unbounded); perturbation AUCs of top-1 correctness over x in [0, max step] lie in [0, max step - min step];
    Gini sparseness, grid pointing game, p-IoU and AP lie in [0, 1]; max-sensitivity is >= 0."""
    if metric == "pointing_game":
        return 0.0, 1.0, protocol.get("variant", "hit") == "hit"
    if metric in ("insertion", "deletion"):
        return (0.0, 1.0, False) if protocol.get("score", "prob") == "prob" else (None, None, False)
    if metric.startswith("perturbation"):
        steps = [float(v) for v in protocol.get("steps") or (0.0, 0.9)]
        return 0.0, max(steps) - min(steps), False
    if metric in ("sparseness", "grid_pointing_game", "open_vocab", "segmentation"):
        return 0.0, 1.0, False
    if metric == "max_sensitivity":
        return 0.0, None, False
    return None, None, False


def metric_ci(values: Sequence[float], metric: str, protocol: dict) -> Cell:
    """The 95 % interval of the module docstring for ``metric``'s values (checked against its range:
    values outside the declared range, or non-0/1 values of a binary metric, fall back to plain t)."""
    v = _finite(values)
    lo, hi, binary = value_range(metric, protocol)
    inside = len(v) > 0 and (lo is None or v.min() >= lo) and (hi is None or v.max() <= hi)
    if binary and inside and np.isin(v, (0.0, 1.0)).all():
        a, b = wilson(float(v.sum()), len(v))
        return Cell(len(v), float(v.mean()), a, b, "wilson")
    c = mean_ci(v)
    if inside and (lo is not None or hi is not None):
        if math.isfinite(c.lo):
            c.lo = max(c.lo, lo) if lo is not None else c.lo
            c.hi = min(c.hi, hi) if hi is not None else c.hi
        c.kind = "t-clipped"
    return c


def interval_label(kind: str, metric: str, protocol: dict) -> str:
    lo, hi, _ = value_range(metric, protocol)
    if kind == "wilson":
        return "Wilson score interval of a proportion"
    if kind == "t-clipped":
        rng = f"[{'-inf' if lo is None else f'{lo:g}'}, {'inf' if hi is None else f'{hi:g}'}]"
        return f"Student t, clipped to {rng}"
    return "Student t"


@dataclass
class Table:
    rows: list            # row labels (method entries)
    cols: list            # column labels (metrics)
    cells: dict           # (row, col) -> Cell
    better: dict          # col -> True (higher is better) / False
    row_keys: dict        # row label -> run_key
    col_keys: dict        # col label -> protocol_key
    models: list
    col_metric: dict = None    # col label -> metric name
    col_protocol: dict = None  # col label -> protocol dict

    def interval_notes(self) -> list[str]:
        """One phrase per column: how its intervals are computed."""
        out = []
        for c in self.cols:
            kinds = sorted({self.cells[(r, c)].kind for r in self.rows if (r, c) in self.cells})
            out.append(f"{c}: " + " / ".join(interval_label(k, self.col_metric[c], self.col_protocol[c])
                                            for k in kinds))
        return out

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


def base_metrics(con: sqlite3.Connection, labels) -> dict:
    """Metric label -> the registered metric it ran: the store's ``metric_names`` (written since it
    exists), else the ``metric`` entry of the folder's last config, else the longest registered metric
    name the label starts with (``insertion_black_paper`` -> ``insertion``), else the label itself."""
    from ..metrics.base import available_metrics

    out: dict = {}
    try:
        out.update(dict(con.execute("SELECT label, metric FROM metric_names")))
    except sqlite3.Error:
        pass
    row = con.execute("SELECT value FROM meta WHERE key='config'").fetchone()
    mp = (json.loads(row[0]).get("metric_params") or {}) if row else {}
    registered = sorted(available_metrics(), key=len, reverse=True)
    for lb in labels:
        if lb in out:
            continue
        p = mp.get(lb) if isinstance(mp, dict) else None
        if isinstance(p, dict) and p.get("metric"):
            out[lb] = str(p["metric"])
            continue
        out[lb] = next((m for m in registered if lb == m or lb.startswith(m + "_")), lb)
    return out


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
    base = base_metrics(con, {v["metric"] for v in protos.values()})
    cells = {}
    for r, rk in row_keys.items():
        for c, pk in col_keys.items():
            if (rk, pk) in values:
                cells[(r, c)] = metric_ci(values[(rk, pk)], base[protos[pk]["metric"]],
                                          json.loads(protos[pk]["protocol"]))
    rows = [r for r in sorted(row_keys) if any((r, c) in cells for c in col_keys)]
    cols = [c for c in sorted(col_keys) if any((r, c) in cells for r in rows)]
    return Table(rows, cols, cells, {c: protos[col_keys[c]]["hib"] for c in cols},
                 {r: row_keys[r] for r in rows}, {c: col_keys[c] for c in cols}, models,
                 {c: base[protos[col_keys[c]]["metric"]] for c in cols},
                 {c: json.loads(protos[col_keys[c]]["protocol"]) for c in cols})


def cell_text(cell: Cell) -> str:
    """``mean [lo, hi]`` (no interval for n < 2 under t)."""
    if not math.isfinite(cell.lo):
        return _fmt(cell.mean)
    return f"{_fmt(cell.mean)} [{_fmt(cell.lo)}, {_fmt(cell.hi)}]"


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
            s = cell_text(cell)
            cells.append(f"**{s}**" if r in t.best(c) else s)
        lines.append(f"| {r} | " + " | ".join(cells) + " |")
    ns = sorted({cell.n for cell in t.cells.values()})
    lines.append("")
    lines.append(f"Mean [95 % interval] over images; n = {', '.join(map(str, ns))} images per cell "
                 f"(NaN-excluded images left out). ↑ higher is better, ↓ lower is better; best in bold. "
                 f"Model: {', '.join(t.models)}. Intervals: {'; '.join(t.interval_notes())}.")
    return "\n".join(lines) + "\n"


def write_csv(t: Table, path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", "metric", "run_key", "protocol_key", "n", "mean", "ci95_low", "ci95_high",
                    "ci95_halfwidth", "higher_is_better", "best", "interval"])
        for r in t.rows:
            for c in t.cols:
                cell = t.cells.get((r, c))
                if cell is None:
                    continue
                w.writerow([r, c, t.row_keys[r], t.col_keys[c], cell.n, cell.mean, cell.lo, cell.hi, cell.half,
                            int(t.better[c]), int(r in t.best(c)),
                            interval_label(cell.kind, t.col_metric[c], t.col_protocol[c])])


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


def _meta(con: sqlite3.Connection, key: str):
    row = con.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
    return json.loads(row[0]) if row else None


def _example_boxes(con: sqlite3.Connection, ids: Sequence[str], info: dict) -> dict:
    """image_id -> (n, 4) ground-truth boxes on the input grid, from the run's data folder (if readable)."""
    cfg = _meta(con, "config") or {}
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
    names = _meta(con, "class_names")
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
            s = html.escape(cell_text(cell))
            s = f"<b>{s}</b>" if r in t.best(c) else s
            tds.append(f"<td title='n={cell.n}'>{s}</td>")
        body.append(f"<tr><th>{html.escape(r)}</th>{''.join(tds)}</tr>")
    return f"<table><tr><th>method</th>{th}</tr>{''.join(body)}</table>"


def _metric_definition(metric: str) -> str:
    """The first paragraph of the metric function's docstring (its definition), one line."""
    try:
        import inspect

        from ..metrics.base import get_metric

        doc = inspect.getdoc(get_metric(metric).fn) or ""
    except Exception:
        return ""
    return " ".join(doc.split("\n\n")[0].split())


def _kv(d: dict) -> str:
    return ", ".join(f"{k}={json.dumps(v)}" for k, v in sorted(d.items())) or "(none)"


def protocol_sections(con: sqlite3.Connection, t: Table) -> list[tuple[str, list, list]]:
    """[(title, header, rows)] describing the model, the metrics' protocols and the methods' parameters."""
    runs = {r[0]: r for r in con.execute("SELECT run_key, label, model, weights, method, method_params, target_rule, "
                                          "seed, model_info, version FROM runs")}
    cfg = _meta(con, "config") or {}
    versions = sorted({r[0] for r in con.execute("SELECT DISTINCT version FROM results") if r[0]})
    model_rows = []
    for key in dict.fromkeys((runs[k][2], runs[k][3], runs[k][8]) for k in t.row_keys.values()):
        model, weights, minfo = key
        mi = json.loads(minfo)
        if mi.get("transform") == "tis":
            how = (f"TIS pipeline (--transform tis): resize to 256 x 256 (aspect ratio not kept), centre crop "
                   f"224, mean {mi.get('mean')}, std {mi.get('std')}")
        else:
            how = (f"resize short side to size/{mi.get('crop_pct')}, centre crop, "
                   f"{mi.get('interpolation', '?')}, mean {mi.get('mean')}, std {mi.get('std')}")
        model_rows.append([model, weights, "x".join(map(str, mi.get("input_size", []))), how])
    data_rows = [[str(cfg.get("data", "?")), str(con.execute("SELECT COUNT(*) FROM images").fetchone()[0]),
                  ", ".join(versions) or "?"]]
    metric_rows = []
    for c in t.cols:
        metric, proto = t.col_metric[c], t.col_protocol[c]
        row = con.execute("SELECT protocol FROM results WHERE protocol_key=? LIMIT 1", (t.col_keys[c],)).fetchone()
        if row and row[0]:  # the protocol as the metric ran it (defaults resolved, tie and AUC rules named)
            proto = {**proto, **json.loads(row[0])}
        lo, hi, binary = value_range(metric, proto)
        kinds = sorted({t.cells[(r, c)].kind for r in t.rows if (r, c) in t.cells})
        metric_rows.append([c, "higher" if t.better[c] else "lower",
                            "{0, 1}" if binary else f"[{'-inf' if lo is None else f'{lo:g}'}, "
                                                    f"{'inf' if hi is None else f'{hi:g}'}]",
                            " / ".join(interval_label(k, metric, proto) for k in kinds), _kv(proto),
                            _metric_definition(metric), t.col_keys[c]])
    method_rows = []
    for r in t.rows:
        k = t.row_keys[r]
        run = runs[k]
        method_rows.append([r, run[4], _kv(json.loads(run[5])), run[6], str(run[7]), run[2], k])
    return [
        ("Model and weights", ["model", "weights", "input", "eval transform"], model_rows),
        ("Data and code", ["data folder", "images in the database", "code versions of the rows"], data_rows),
        ("Metrics", ["metric", "better", "range", "95 % interval", "protocol", "definition", "protocol key"],
         metric_rows),
        ("Methods", ["entry", "method", "parameters", "target", "seed", "model", "run key"], method_rows),
    ]


def error_rows(con: sqlite3.Connection, run_keys: Optional[Sequence[str]] = None) -> list[list]:
    """Failed work grouped by (stage, method entry, metric, message): [stage, entry, metric, count, images, message]."""
    q = "SELECT stage, label, metric, message, image_id, run_key FROM errors ORDER BY stage, label, metric, image_id"
    groups: dict = {}
    for stage, label, metric, msg, iid, rk in con.execute(q):
        if run_keys is not None and rk and rk not in set(run_keys):
            continue
        groups.setdefault((stage, label, metric, msg), []).append(iid)
    out = []
    for (stage, label, metric, msg), ids in groups.items():
        shown = ", ".join(ids[:5]) + (f", ... (+{len(ids) - 5})" if len(ids) > 5 else "")
        out.append([stage, label or "–", metric or "–", str(len(ids)), shown, msg])
    return out


def _md_table(header: list, rows: list) -> str:
    def esc(v):
        return str(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(esc(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _html_table(header: list, rows: list) -> str:
    th = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table class='meta'><tr>{th}</tr>{body}</table>"


ERRORS_NOTE = ("Work that failed and was skipped (the run went on): an unreadable image (stage image: every method "
               "and metric skip it), a method that raised on the image (its metrics skip it), a metric that raised. "
               "Each is retried by the next run on this folder; tracebacks are in logs/.")


def write_report(out, run_keys: Optional[Sequence[str]] = None, protocol_keys: Optional[Sequence[str]] = None,
                 examples: int = 4, subset: Optional[str] = None) -> dict:
    """Merge any shard files (kept on disk), then write ``results.md``, ``results.csv`` and ``report.html``.

    By default in ``out`` and for everything in its database; with ``run_keys``/``protocol_keys`` only
    those (a run's own view), written to ``out/<subset>`` (``subset`` is required then, so a subset never
    replaces the folder's full report)."""
    out = Path(out)
    db = out / MAIN_DB
    if not db.exists() and not (out / "shards").is_dir():
        raise InputError(f"no benchmark results in {out} (expected {db}).")
    if (run_keys is not None or protocol_keys is not None) and not subset:
        raise InputError("a report of a subset of the runs needs its own folder (subset=NAME), so that "
                         "results.md keeps showing everything in the database.")
    merge_shards(out)
    dest = out / subset if subset else out
    dest.mkdir(parents=True, exist_ok=True)
    con = connect(db)
    try:
        resolve_errors(con)
        t = build_table(con, run_keys, protocol_keys)
        if not t.rows:
            raise InputError(f"{db} holds no result rows yet.")
        from .datasets import dataset_scores_markdown

        pooled = dataset_scores_markdown(con, t)  # mIoU, pixel accuracy, p-mIoU: pooled over the dataset
        md = table_markdown(t) + pooled
        version = con.execute("SELECT value FROM meta WHERE key='version'").fetchone()
        n_rows = con.execute("SELECT COUNT(*) FROM results").fetchone()[0]
        sections = protocol_sections(con, t)
        errs = error_rows(con, list(t.row_keys.values()) if run_keys is not None else None)
        scope = ("this run's methods and metrics only (the full report is in the folder above)" if subset
                 else "every run in this folder's database")
        md_parts = [f"# vitlens benchmark results\n\nShows {scope}.\n\n{md}"]
        if errs:
            md_parts.append(f"\n## Errors ({sum(int(e[3]) for e in errs)})\n\n{ERRORS_NOTE}\n\n"
                            + _md_table(["stage", "method", "metric", "n", "images", "message"], errs))
        md_parts.append("\n## Protocol\n")
        for title, header, rows in sections:
            md_parts.append(f"\n### {title}\n\n" + _md_table(header, rows))
        (dest / "results.md").write_text("".join(md_parts))
        write_csv(t, dest / "results.csv")
        ex = examples_figure(con, t, examples)
        cu = curves_figure(con, t)
        parts = [
            "<!doctype html><html><head><meta charset='utf-8'><title>vitlens benchmark report</title>",
            "<style>body{font-family:sans-serif;margin:24px;max-width:1150px}table{border-collapse:collapse}"
            "td,th{border:1px solid #bbb;padding:4px 10px;text-align:right}th{background:#f2f2f2}"
            "table.meta td{text-align:left;font-size:85%;vertical-align:top}"
            "img{max-width:100%}p.note{color:#555;font-size:90%}.err{color:#a00}</style></head><body>",
            "<h1>vitlens benchmark report</h1>",
            f"<p class='note'>{html.escape(', '.join(t.models))} · {n_rows} result rows · code "
            f"{html.escape(json.loads(version[0]) if version else '?')} · shows {html.escape(scope)}</p>",
            "<h2>Results</h2>", table_html(t), *([f"<pre>{html.escape(pooled)}</pre>"] if pooled else []),
            "<p class='note'>Mean [95 % interval] over images; best value in bold; ↑ higher is better, ↓ lower is "
            "better. Hover a cell for its number of images. Intervals: "
            + html.escape("; ".join(t.interval_notes())) + ".</p>",
        ]
        if errs:
            parts += [f"<h2 class='err'>Errors ({sum(int(e[3]) for e in errs)})</h2>",
                      f"<p class='note'>{html.escape(ERRORS_NOTE)}</p>",
                      _html_table(["stage", "method", "metric", "n", "images", "message"], errs)]
        if cu:
            parts += ["<h2>Mean curves</h2>", f"<img alt='curves' src='data:image/png;base64,{cu}'>"]
        if ex:
            parts += ["<h2>Examples</h2>",
                      "<p class='note'>Ground-truth boxes in green; the cross marks each map's maximum (the "
                      "pixel the pointing game reads): green = pointing-game hit, red = miss, white = no "
                      "pointing-game value (excluded or not evaluated). Titles: image id and its class; "
                      "'explains' names the explained class where it differs from the label.</p>",
                      f"<img alt='examples' src='data:image/png;base64,{ex}'>"]
        parts.append("<h2>Protocol</h2>")
        for title, header, rows in sections:
            parts += [f"<h3>{html.escape(title)}</h3>", _html_table(header, rows)]
        parts.append("</body></html>")
        (dest / "report.html").write_text("\n".join(parts))
    finally:
        con.close()
    return dict(markdown=str(dest / "results.md"), csv=str(dest / "results.csv"), html=str(dest / "report.html"),
                table=md, errors=errs)
