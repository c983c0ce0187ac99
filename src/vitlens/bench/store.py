"""The benchmark's SQLite store: maps, per-image metric rows, run descriptions and image metadata.

Durability: every database is opened in WAL mode with ``synchronous=FULL``; each batch of maps and
each batch of metric rows is written in one transaction (``BEGIN IMMEDIATE ... COMMIT``), so a process
killed at any moment (``kill -9`` included) leaves every committed batch intact and the file
consistent; an interrupted transaction is rolled back by SQLite on the next open.

Keys: a *run key* hashes everything that determines a map (model, weights, model arguments, method,
its parameters, seed, target rule); a *protocol key* hashes a metric's full protocol (defaults filled
in). Rows are unique on ``(run_key, image_id, metric, protocol_key)``, so runs with different
parameters never mix, and merging shard files is an idempotent ``INSERT OR IGNORE``.

Maps are stored as zlib-compressed float16 arrays; curves as zlib-compressed float32.
"""
from __future__ import annotations

import hashlib
import json
import sqlite3
import time
import zlib
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import numpy as np

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS runs (
  run_key TEXT PRIMARY KEY, label TEXT, model TEXT, weights TEXT, method TEXT, method_params TEXT,
  target_rule TEXT, seed INTEGER, model_info TEXT, version TEXT, created REAL);
CREATE TABLE IF NOT EXISTS protocols (
  protocol_key TEXT PRIMARY KEY, metric TEXT, protocol TEXT, higher_is_better INTEGER);
CREATE TABLE IF NOT EXISTS images (
  image_id TEXT PRIMARY KEY, path TEXT, label INTEGER, synset TEXT, coverage REAL);
CREATE TABLE IF NOT EXISTS maps (
  run_key TEXT, image_id TEXT, target INTEGER, shape TEXT, map BLOB, seconds REAL, version TEXT,
  created REAL, PRIMARY KEY (run_key, image_id));
CREATE TABLE IF NOT EXISTS results (
  run_key TEXT, image_id TEXT, metric TEXT, protocol_key TEXT, model TEXT, method TEXT, value REAL,
  curve BLOB, xs BLOB, target INTEGER, method_params TEXT, protocol TEXT, version TEXT, seconds REAL,
  created REAL, PRIMARY KEY (run_key, image_id, metric, protocol_key));
CREATE TABLE IF NOT EXISTS errors (
  image_id TEXT, stage TEXT, run_key TEXT, metric TEXT, protocol_key TEXT, label TEXT, message TEXT,
  version TEXT, created REAL, PRIMARY KEY (image_id, stage, run_key, protocol_key));
"""
TABLES = ("meta", "runs", "protocols", "images", "maps", "results", "errors")
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


def _jsonable(v: Any) -> Any:
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    if isinstance(v, (list, tuple)):
        return [_jsonable(u) for u in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(u) for k, u in sorted(v.items())}
    if hasattr(v, "tolist"):
        return v.tolist()
    return repr(v)


def canonical(obj: Any) -> str:
    """Deterministic JSON of ``obj`` (sorted keys; non-JSON values by ``repr``)."""
    return json.dumps(_jsonable(obj), sort_keys=True, separators=(",", ":"))


def key_of(obj: Any) -> str:
    """A 16-hex-digit SHA-256 key of ``canonical(obj)``."""
    return hashlib.sha256(canonical(obj).encode()).hexdigest()[:16]


def encode_map(m: np.ndarray) -> tuple[bytes, str]:
    a = np.ascontiguousarray(np.asarray(m, dtype=np.float16))
    return zlib.compress(a.tobytes(), 6), canonical(list(a.shape))


def decode_map(blob: bytes, shape: str) -> np.ndarray:
    return np.frombuffer(zlib.decompress(blob), dtype=np.float16).reshape(json.loads(shape)).astype(np.float32)


def encode_f32(a: Optional[np.ndarray]) -> Optional[bytes]:
    if a is None:
        return None
    return zlib.compress(np.ascontiguousarray(np.asarray(a, dtype=np.float32)).tobytes(), 6)


def decode_f32(blob: Optional[bytes]) -> Optional[np.ndarray]:
    return None if blob is None else np.frombuffer(zlib.decompress(blob), dtype=np.float32)


def connect(path: Path, readonly: bool = False) -> sqlite3.Connection:
    """Open (and create) a store database with the durability settings above."""
    path = Path(path)
    if readonly:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=60, isolation_level=None)
        return con
    path.parent.mkdir(parents=True, exist_ok=True)
    con = sqlite3.connect(str(path), timeout=60, isolation_level=None)  # autocommit; explicit BEGINs
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("PRAGMA synchronous=FULL")
    con.execute("PRAGMA busy_timeout=60000")
    con.executescript(SCHEMA)
    return con


class Transaction:
    """``with Transaction(con):`` runs the block in ``BEGIN IMMEDIATE ... COMMIT`` (rollback on error)."""

    def __init__(self, con: sqlite3.Connection):
        self.con = con

    def __enter__(self) -> sqlite3.Connection:
        self.con.execute("BEGIN IMMEDIATE")
        return self.con

    def __exit__(self, exc_type, exc, tb) -> None:
        self.con.execute("ROLLBACK" if exc_type else "COMMIT")


class Store:
    """A writable database (``path``) plus read-only databases whose committed work also counts as done.

    In a sharded run ``path`` is the shard's own file and ``also`` the merged ``results.sqlite``; in a
    single-process run both are the same file.
    """

    def __init__(self, path: Path, also: Sequence[Path] = ()):
        self.path = Path(path)
        self.con = connect(self.path)
        self.readers = [connect(p, readonly=True) for p in also if Path(p).exists() and Path(p) != self.path]

    def close(self) -> None:
        for c in [self.con, *self.readers]:
            c.close()

    def _all(self) -> list[sqlite3.Connection]:
        return [self.con, *self.readers]

    # -- descriptions -------------------------------------------------------------------------------
    def put_meta(self, items: dict) -> None:
        with Transaction(self.con) as c:
            c.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", [(k, canonical(v)) for k, v in items.items()])

    def put_run(self, run_key: str, **fields) -> None:
        with Transaction(self.con) as c:
            c.execute("INSERT OR IGNORE INTO runs VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                      (run_key, fields["label"], fields["model"], fields["weights"], fields["method"],
                       canonical(fields["method_params"]), fields["target_rule"], fields["seed"],
                       canonical(fields["model_info"]), fields["version"], time.time()))

    def put_protocol(self, protocol_key: str, metric: str, protocol: dict, higher_is_better: bool) -> None:
        with Transaction(self.con) as c:
            c.execute("INSERT OR IGNORE INTO protocols VALUES (?,?,?,?)",
                      (protocol_key, metric, canonical(protocol), int(bool(higher_is_better))))

    def put_images(self, rows: Iterable[tuple]) -> None:
        with Transaction(self.con) as c:
            c.executemany("INSERT OR IGNORE INTO images VALUES (?,?,?,?,?)", list(rows))

    # -- maps ---------------------------------------------------------------------------------------
    def done_maps(self, run_key: str, image_ids: Sequence[str]) -> set[str]:
        out: set[str] = set()
        q = f"SELECT image_id FROM maps WHERE run_key=? AND image_id IN ({','.join('?' * len(image_ids))})"
        for c in self._all():
            out.update(r[0] for r in c.execute(q, (run_key, *image_ids)))
        return out

    def put_maps(self, run_key: str, image_ids: Sequence[str], targets: Sequence[int], maps: np.ndarray,
                 seconds: float, version: str) -> None:
        now = time.time()
        rows = []
        for i, iid in enumerate(image_ids):
            blob, shape = encode_map(maps[i])
            rows.append((run_key, iid, int(targets[i]), shape, blob, seconds / max(len(image_ids), 1), version, now))
        with Transaction(self.con) as c:
            c.executemany("INSERT OR REPLACE INTO maps VALUES (?,?,?,?,?,?,?,?)", rows)
            c.executemany("DELETE FROM errors WHERE stage='method' AND run_key=? AND image_id=?",
                          [(run_key, iid) for iid in image_ids])

    def get_maps(self, run_key: str, image_ids: Sequence[str]) -> tuple[np.ndarray, list[int]]:
        """(n, H, W) float32 maps (decoded from float16) and targets, in the order of ``image_ids``."""
        found: dict[str, tuple] = {}
        q = f"SELECT image_id, target, shape, map FROM maps WHERE run_key=? AND image_id IN ({','.join('?' * len(image_ids))})"
        for c in self._all():
            for iid, tgt, shape, blob in c.execute(q, (run_key, *image_ids)):
                found.setdefault(iid, (tgt, decode_map(blob, shape)))
        missing = [i for i in image_ids if i not in found]
        if missing:
            raise KeyError(f"maps missing for {missing[:3]}")
        return np.stack([found[i][1] for i in image_ids]), [int(found[i][0]) for i in image_ids]

    # -- results ------------------------------------------------------------------------------------
    def done_results(self, run_key: str, metric: str, protocol_key: str, image_ids: Sequence[str]) -> set[str]:
        out: set[str] = set()
        q = (f"SELECT image_id FROM results WHERE run_key=? AND metric=? AND protocol_key=? "
             f"AND image_id IN ({','.join('?' * len(image_ids))})")
        for c in self._all():
            out.update(r[0] for r in c.execute(q, (run_key, metric, protocol_key, *image_ids)))
        return out

    def put_results(self, rows: Sequence[dict]) -> None:
        now = time.time()
        vals = [(r["run_key"], r["image_id"], r["metric"], r["protocol_key"], r["model"], r["method"],
                 None if r["value"] is None or not np.isfinite(r["value"]) else float(r["value"]),
                 encode_f32(r.get("curve")), encode_f32(r.get("xs")), int(r["target"]),
                 canonical(r["method_params"]), canonical(r["protocol"]), r["version"], r["seconds"], now)
                for r in rows]
        with Transaction(self.con) as c:
            c.executemany("INSERT OR REPLACE INTO results VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)", vals)
            c.executemany("DELETE FROM errors WHERE stage='metric' AND run_key=? AND image_id=? AND protocol_key=?",
                          [(r["run_key"], r["image_id"], r["protocol_key"]) for r in rows])

    # -- errors -------------------------------------------------------------------------------------
    def put_errors(self, rows: Sequence[dict]) -> None:
        """Record failed work: dicts with image_id, stage (see ``STAGES``), run_key, metric, protocol_key,
        label, message, version (missing keys: "")."""
        now = time.time()
        vals = [(r["image_id"], r["stage"], r.get("run_key") or "", r.get("metric") or "",
                 r.get("protocol_key") or "", r.get("label") or "", str(r.get("message", ""))[:2000],
                 r.get("version") or "", now) for r in rows]
        with Transaction(self.con) as c:
            c.executemany("INSERT OR REPLACE INTO errors VALUES (?,?,?,?,?,?,?,?,?)", vals)

    def clear_image_errors(self, image_ids: Sequence[str]) -> None:
        """The images were read successfully: drop their "image" error rows."""
        if not image_ids:
            return
        with Transaction(self.con) as c:
            c.executemany("DELETE FROM errors WHERE stage='image' AND image_id=?", [(i,) for i in image_ids])

    # -- what is done (whole runs, for the start line) -------------------------------------------------
    def map_ids(self, run_key: str) -> set[str]:
        out: set[str] = set()
        for c in self._all():
            out.update(r[0] for r in c.execute("SELECT image_id FROM maps WHERE run_key=?", (run_key,)))
        return out

    def result_ids(self, run_key: str, metric: str, protocol_key: str) -> set[str]:
        out: set[str] = set()
        for c in self._all():
            out.update(r[0] for r in c.execute("SELECT image_id FROM results WHERE run_key=? AND metric=? AND "
                                               "protocol_key=?", (run_key, metric, protocol_key)))
        return out


def resolve_errors(con: sqlite3.Connection) -> None:
    """Drop error rows whose work has since succeeded (e.g. in another shard or a later run)."""
    with Transaction(con) as c:
        for q in _RESOLVE:
            c.execute(q)


def merge_into(main: Path, shards: Sequence[Path], remove: bool = True) -> int:
    """Copy every row of the shard databases into ``main`` (``INSERT OR IGNORE``, one transaction per
    shard); delete each shard file after its rows are committed. Returns the number of shards merged."""
    con = connect(main)
    n = 0
    try:
        for s in shards:
            s = Path(s)
            if not s.exists() or s.resolve() == Path(main).resolve():
                continue
            connect(s).close()  # checkpoint-safe open: creates missing tables in an empty shard
            con.execute("ATTACH DATABASE ? AS shard", (str(s),))
            try:
                with Transaction(con) as c:
                    for t in TABLES:
                        verb = "INSERT OR REPLACE" if t == "meta" else "INSERT OR IGNORE"
                        c.execute(f"{verb} INTO main.{t} SELECT * FROM shard.{t}")
            finally:
                con.execute("DETACH DATABASE shard")
            n += 1
            resolve_errors(con)
            if remove:
                for suffix in ("", "-wal", "-shm"):
                    p = Path(str(s) + suffix)
                    if p.exists():
                        p.unlink()
    finally:
        con.close()
    return n
