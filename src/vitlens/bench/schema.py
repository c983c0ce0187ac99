"""The layout of a benchmark database file and how it is opened: tables, the schema version and its
migration, the durability settings, transactions.

Durability: every database is opened in WAL mode with ``synchronous=FULL``; each batch of maps and
each batch of metric rows is written in one transaction (``BEGIN IMMEDIATE ... COMMIT``), so a process
killed at any moment (``kill -9`` included) leaves every committed batch intact and the file
consistent; an interrupted transaction is rolled back by SQLite on the next open.

Schema versions (``meta`` key ``schema_version``; a file without it is version 1):

1. (vitlens 0.1) per-image counts of the pooled metrics (segmentation, open-vocabulary) in the
   ``results.curve`` column, with ``xs`` NULL;
2. ``results.counts`` holds those counts; ``curve`` only holds curves (always with their ``xs``).

:func:`connect` migrates a writable file to the current version when it opens it (idempotent, one
transaction, safe when several processes open the same file).
"""
from __future__ import annotations

import json
import sqlite3
from pathlib import Path

SCHEMA_VERSION = 2
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS runs (
  run_key TEXT PRIMARY KEY, label TEXT, model TEXT, weights TEXT, method TEXT, method_params TEXT,
  target_rule TEXT, seed INTEGER, model_info TEXT, version TEXT, created REAL);
CREATE TABLE IF NOT EXISTS protocols (
  protocol_key TEXT PRIMARY KEY, metric TEXT, protocol TEXT, higher_is_better INTEGER);
CREATE TABLE IF NOT EXISTS metric_names (label TEXT PRIMARY KEY, metric TEXT);
CREATE TABLE IF NOT EXISTS images (
  image_id TEXT PRIMARY KEY, path TEXT, label INTEGER, synset TEXT, coverage REAL);
CREATE TABLE IF NOT EXISTS maps (
  run_key TEXT, image_id TEXT, target INTEGER, shape TEXT, map BLOB, seconds REAL, version TEXT,
  created REAL, PRIMARY KEY (run_key, image_id));
CREATE TABLE IF NOT EXISTS results (
  run_key TEXT, image_id TEXT, metric TEXT, protocol_key TEXT, model TEXT, method TEXT, value REAL,
  curve BLOB, xs BLOB, target INTEGER, method_params TEXT, protocol TEXT, version TEXT, seconds REAL,
  created REAL, counts BLOB, PRIMARY KEY (run_key, image_id, metric, protocol_key));
CREATE TABLE IF NOT EXISTS errors (
  image_id TEXT, stage TEXT, run_key TEXT, metric TEXT, protocol_key TEXT, label TEXT, message TEXT,
  version TEXT, created REAL, PRIMARY KEY (image_id, stage, run_key, protocol_key));
"""
TABLES = ("meta", "runs", "protocols", "metric_names", "images", "maps", "results", "errors")
#: ``metric_names``: a metric label of the results (``insertion_black``) -> the registered metric it runs
#: (``insertion``), for the report's value ranges and definitions.
#: ``results``: ``curve``/``xs`` the metric's per-image curve and its abscissa (zlib float32), ``counts``
#: the per-image counts a pooled metric accumulates (zlib float32; integers, exact).
#: ``errors.stage``: the image could not be read ("image"), a method raised on it ("method"), a metric
#: raised on it ("metric"). ``run_key``/``protocol_key`` are "" where they do not apply. An error row is
#: removed when the same work later succeeds (:func:`resolve_errors`); failed work is retried by the
#: next run (it is not "done").
STAGES = ("image", "method", "metric")
_RESOLVE = (
    "DELETE FROM errors WHERE stage='method' AND EXISTS (SELECT 1 FROM maps m WHERE m.run_key=errors.run_key "
    "AND m.image_id=errors.image_id)",
    "DELETE FROM errors WHERE stage='metric' AND EXISTS (SELECT 1 FROM results r WHERE r.run_key=errors.run_key "
    "AND r.image_id=errors.image_id AND r.protocol_key=errors.protocol_key)",
    "DELETE FROM errors WHERE stage='image' AND EXISTS (SELECT 1 FROM maps m WHERE m.image_id=errors.image_id "
    "AND m.created > errors.created)",
)


class Transaction:
    """``with Transaction(con):`` runs the block in ``BEGIN IMMEDIATE ... COMMIT`` (rollback on error)."""

    def __init__(self, con: sqlite3.Connection):
        self.con = con

    def __enter__(self) -> sqlite3.Connection:
        self.con.execute("BEGIN IMMEDIATE")
        return self.con

    def __exit__(self, exc_type, exc, tb) -> None:
        self.con.execute("ROLLBACK" if exc_type else "COMMIT")


def connect(path: Path, readonly: bool = False) -> sqlite3.Connection:
    """Open a store database with the durability settings above; a writable one is created if missing and
    migrated to :data:`SCHEMA_VERSION` (:func:`migrate`)."""
    path = Path(path)
    if readonly:
        return sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=60, isolation_level=None)
    path.parent.mkdir(parents=True, exist_ok=True)
    con = sqlite3.connect(str(path), timeout=60, isolation_level=None)  # autocommit; explicit BEGINs
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("PRAGMA synchronous=FULL")
    con.execute("PRAGMA busy_timeout=60000")
    con.executescript(SCHEMA)
    migrate(con)
    return con


def columns(con: sqlite3.Connection, table: str, schema: str = "main") -> list[str]:
    """The column names of ``schema.table`` in their order."""
    return [r[1] for r in con.execute(f"PRAGMA {schema}.table_info({table})")]


def schema_version(con: sqlite3.Connection) -> int:
    row = con.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
    return int(json.loads(row[0])) if row else 1


def migrate(con: sqlite3.Connection) -> bool:
    """Bring the database to :data:`SCHEMA_VERSION` (see the module docstring); ``True`` if it changed.
    Idempotent: the checks are repeated inside the write transaction, so concurrent openers agree."""
    if "counts" in columns(con, "results") and schema_version(con) >= SCHEMA_VERSION:
        return False
    with Transaction(con) as c:
        if "counts" not in columns(c, "results"):
            c.execute("ALTER TABLE results ADD COLUMN counts BLOB")
        if schema_version(c) < 2:  # version 1 kept the pooled metrics' counts in curve (xs NULL)
            c.execute("UPDATE results SET counts=curve, curve=NULL WHERE xs IS NULL AND curve IS NOT NULL "
                      "AND counts IS NULL")
        c.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", (json.dumps(SCHEMA_VERSION),))
    return True


def read_meta(con: sqlite3.Connection, key: str):
    """The JSON value stored under ``key`` in ``meta`` (``None`` if absent)."""
    row = con.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
    return json.loads(row[0]) if row else None


def resolve_errors(con: sqlite3.Connection) -> None:
    """Drop error rows whose work has since succeeded (e.g. in another shard or a later run)."""
    with Transaction(con) as c:
        for q in _RESOLVE:
            c.execute(q)
