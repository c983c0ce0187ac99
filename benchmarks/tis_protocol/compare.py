"""Side-by-side table of the TIS code's protocol vs the ``paper`` protocol, per method, on the images that
have every metric of that method in both columns (so both columns of a row average the same images; n is
printed per method). Run ``vitlens report DIR`` first (it merges shard files).

Two folders (``tis_code.toml`` and ``paper.toml``)::

    python benchmarks/tis_protocol/compare.py runs/tis_code runs/paper > table.md

One folder with both protocols' metrics (``both.toml``: the paper protocol's metrics end in ``_paper``)::

    python benchmarks/tis_protocol/compare.py runs/both > table.md

Max-sensitivity (``sensitivity.toml``, fewer images) is compared on its own images: rows are grouped by
(method, metric family), so each family has its own n.
"""
from __future__ import annotations

import sqlite3
import sys
from collections import defaultdict

import numpy as np


def load(folder: str) -> dict:
    con = sqlite3.connect(f"{folder}/results.sqlite")
    out: dict = defaultdict(dict)  # (method, metric) -> image -> value (None = excluded by the protocol)
    for method, metric, image, value in con.execute("SELECT method, metric, image_id, value FROM results"):
        out[(method, metric)][image] = value
    con.close()
    return out


def split(folder: str, suffix: str = "_paper") -> tuple[dict, dict]:
    """One folder holding both protocols: metrics named ``X`` (tis_code) and ``X_paper`` (paper)."""
    r = load(folder)
    ra = {k: v for k, v in r.items() if not k[1].endswith(suffix)}
    rb = {(m, met[:-len(suffix)]): v for (m, met), v in r.items() if met.endswith(suffix)}
    return ra, rb


def main(a: str, b: str | None = None) -> None:
    if b is None:
        ra, rb = split(a)
        a, b = "tis_code", "paper"
    else:
        ra, rb = load(a), load(b)
    keys = sorted(set(ra) & set(rb))
    methods = sorted({m for m, _ in keys})
    metrics = list(dict.fromkeys(k[1] for k in sorted(keys, key=lambda k: k[1])))
    print(f"| method | n images | metric | {a.rstrip('/').split('/')[-1]} | {b.rstrip('/').split('/')[-1]} |")
    print("|---|---|---|---|---|")
    def family(met: str) -> str:
        return "sensitivity" if "sensitivity" in met else "main"

    for m in methods:
        common: dict = {}
        for k in keys:
            if k[0] == m:
                s = set(ra[k]) & set(rb[k])
                f = family(k[1])
                common[f] = s if f not in common else common[f] & s
        for met in metrics:
            images = sorted(common.get(family(met)) or [])
            if (m, met) not in ra or not images:
                continue
            cells = []
            for r in (ra, rb):
                v = np.array([np.nan if r[(m, met)][i] is None else r[(m, met)][i] for i in images], dtype=float)
                ok = v[np.isfinite(v)]
                extra = f" ({len(ok)} kept)" if len(ok) != len(images) else ""
                cells.append(f"{ok.mean():.3f}{extra}" if len(ok) else "n/a")
            print(f"| {m} | {len(images)} | {met} | {cells[0]} | {cells[1]} |")


if __name__ == "__main__":
    main(*sys.argv[1:3])
