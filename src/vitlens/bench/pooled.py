"""Dataset-level (pooled) scores of a benchmark folder: for metrics whose published number is pooled over
the dataset rather than a mean of per-image values (segmentation pixel accuracy / mIoU / mAP as
``imagenet_seg_eval.py``, open-vocabulary p-mIoU), computed from the per-image ``counts`` each result
row stores, by the function the metric declares (:attr:`vitlens.metrics.base.MetricInfo.pooled`).
"""
from __future__ import annotations

import sqlite3
from typing import Optional

import numpy as np

from ..errors import InputError
from .store import decode_f32
from .tables import Table


def dataset_scores(con: sqlite3.Connection, run_key: str, protocol_key: str, metric: str) -> Optional[dict]:
    """The dataset-level numbers of one (method entry, metric protocol) from its stored rows; ``metric`` is
    the registered metric the protocol runs (``None`` for metrics that are not pooled, or rows without
    counts)."""
    from ..metrics.base import REGISTRY

    pooled = REGISTRY.get(metric).pooled if metric in REGISTRY else None
    if pooled is None:
        return None
    counts, targets, values = [], [], []
    for blob, target, value in con.execute("SELECT counts, target, value FROM results WHERE run_key=? AND "
                                           "protocol_key=? AND counts IS NOT NULL", (run_key, protocol_key)):
        counts.append(decode_f32(blob))
        targets.append(int(target))
        values.append(0.0 if value is None else float(value))
    if not counts:
        return None
    try:
        return pooled(np.stack(counts), targets, values)
    except InputError:
        return None


def dataset_scores_markdown(con: sqlite3.Connection, table: Table) -> str:
    """A markdown table of the dataset-level numbers of every row of the report ``table``; ``""`` if none."""
    cols: list = []
    cells: dict = {}
    for c in table.cols:
        pk = table.col_keys[c]
        for r in table.rows:
            s = dataset_scores(con, table.row_keys[r], pk, table.col_metric[c])
            for name, v in (s or {}).items():
                col = f"{c} {name}"
                if col not in cols:
                    cols.append(col)
                cells[(r, col)] = v
    if not cols:
        return ""
    lines = ["", "Dataset-level scores (pooled over all images as the papers report them; higher is better):", "",
             "| method | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 1)]
    for r in table.rows:
        lines.append(f"| {r} | " + " | ".join(f"{cells[(r, c)]:.4f}" if (r, c) in cells else "–" for c in cols) + " |")
    return "\n".join(lines) + "\n"
