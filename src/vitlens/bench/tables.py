"""The results table of a benchmark folder: one row per method entry, one column per metric protocol, each
cell the mean and 95 % interval of :mod:`.stats`; written as markdown, CSV and HTML.

Rows and columns: every (method entry, metric protocol) pair in the database (or the given run and
protocol keys); entries or metrics that share a label get a key suffix (``rollout [1a2b3c]``), several
models a ``model / label`` prefix. The best mean of each column (by the metric's direction) is in bold.
Cells print ``mean [lo, hi]``.
"""
from __future__ import annotations

import csv
import html
import json
import math
import sqlite3
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from .stats import Cell, interval_label, metric_ci


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
