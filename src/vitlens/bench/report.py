"""Reports of a benchmark folder: ``results.md``, ``results.csv`` and a self-contained ``report.html``.

What they show: every (method entry, metric protocol) pair in the folder's database (all runs, not only
the last one; a run's own view is written to ``OUT/this-run/`` only when asked, ``--report-subset``).

The pieces: the table of means and 95 % intervals (:mod:`.tables`, statistics in :mod:`.stats`), the
dataset-level pooled scores (:mod:`.pooled`), the figures (:mod:`.figures`). This module assembles them:
a "Protocol" section lists every metric's full protocol (and its definition), every method entry's
parameters, the target rule, seed, model, weights and code version; an "Errors" section lists the
images, methods and metrics that failed (``errors`` rows of the store).

``report.html`` embeds everything as base64 PNGs (no external files): the table, the mean
insertion/deletion curves (any metric with curves) per method, and example images x method heatmaps.
"""
from __future__ import annotations

import html
import json
import sqlite3
from pathlib import Path
from typing import Optional, Sequence

from ..errors import InputError
from .figures import curves_figure, examples_figure
from .pooled import dataset_scores_markdown
from .schema import connect, read_meta, resolve_errors
from .shards import SHARD_DIR, merge_shards
from .stats import interval_label, range_text, value_range
from .store import MAIN_DB
from .tables import Table, build_table, table_html, table_markdown, write_csv


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
    cfg = read_meta(con, "config") or {}
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
                            "{0, 1}" if binary else range_text(lo, hi),
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
    if not db.exists() and not (out / SHARD_DIR).is_dir():
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
        pooled = dataset_scores_markdown(con, t)  # mIoU, pixel accuracy, p-mIoU: pooled over the dataset
        md = table_markdown(t) + pooled
        version = read_meta(con, "version")
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
            f"{html.escape(version or '?')} · shows {html.escape(scope)}</p>",
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
