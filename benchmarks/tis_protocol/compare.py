"""Side-by-side table of two ``vitlens bench`` folders (the TIS code's protocol vs the ``paper`` protocol),
per method on the images that have every metric of that method in both folders (so both columns of a
row average the same images; n is printed per method). Run ``vitlens report DIR`` first (it merges shard files).

    python benchmarks/tis_protocol/compare.py /tmp/h13runs/tis_code /tmp/h13runs/paper > table.md
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


def main(a: str, b: str) -> None:
    ra, rb = load(a), load(b)
    keys = sorted(set(ra) & set(rb))
    methods = sorted({m for m, _ in keys})
    metrics = list(dict.fromkeys(k[1] for k in sorted(keys, key=lambda k: k[1])))
    print(f"| method | n images | metric | {a.rstrip('/').split('/')[-1]} | {b.rstrip('/').split('/')[-1]} |")
    print("|---|---|---|---|---|")
    for m in methods:
        images = None
        for k in keys:
            if k[0] == m:
                s = set(ra[k]) & set(rb[k])
                images = s if images is None else images & s
        images = sorted(images or [])
        for met in metrics:
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
    main(sys.argv[1], sys.argv[2])
