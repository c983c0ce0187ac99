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

Background writer (:meth:`Store.start_writer`, used by the bench loop; ``VITLENS_BENCH_WRITER=0`` turns it
off): ``put_maps``/``put_results``/``put_errors``/``clear_image_errors`` hand their rows to one thread
that owns a second connection and does the compression, the inserts and the ``COMMIT`` (fsync) while the
device computes. Writes keep their order (one FIFO queue) and their transactions, so the durability above
is unchanged: what is committed is complete; what a killed process had queued is simply not done and is
recomputed on resume. Until a write is committed, its maps and "done" marks are served from memory
(the float16 round trip applied, so a pending map reads back exactly as a stored one). A failed write
is raised, as :class:`StoreWriteError`, by the next store call of the main thread.
"""
from __future__ import annotations

import hashlib
import json
import queue
import sqlite3
import threading
import time
import zlib
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import numpy as np

from ..errors import VitlensError

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
  created REAL, PRIMARY KEY (run_key, image_id, metric, protocol_key));
CREATE TABLE IF NOT EXISTS errors (
  image_id TEXT, stage TEXT, run_key TEXT, metric TEXT, protocol_key TEXT, label TEXT, message TEXT,
  version TEXT, created REAL, PRIMARY KEY (image_id, stage, run_key, protocol_key));
"""
TABLES = ("meta", "runs", "protocols", "metric_names", "images", "maps", "results", "errors")
#: ``metric_names``: a metric label of the results (``insertion_black``) -> the registered metric it runs
#: (``insertion``), for the report's value ranges and definitions.
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


def encode_map(m: np.ndarray, dtype: str = "float16") -> tuple[bytes, str]:
    """Compressed map; float16 maps keep the plain shape list as ``shape``, other dtypes (float32 raw maps)
    record ``{"dtype": ..., "shape": [...]}``."""
    a = np.ascontiguousarray(np.asarray(m, dtype=np.dtype(dtype)))
    shape = list(a.shape) if dtype == "float16" else dict(dtype=dtype, shape=list(a.shape))
    return zlib.compress(a.tobytes(), 6), canonical(shape)


def decode_map(blob: bytes, shape: str) -> np.ndarray:
    info = json.loads(shape)
    dtype, dims = ("float16", info) if isinstance(info, list) else (info["dtype"], info["shape"])
    return np.frombuffer(zlib.decompress(blob), dtype=np.dtype(dtype)).reshape(dims).astype(np.float32)


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


class StoreWriteError(VitlensError, RuntimeError):
    """A background write to the results database failed (disk full, database locked, ...): the CLI
    prints it as one line; the committed work stays and the next run resumes from it."""


class _Writer:
    """One thread that runs write jobs ``fn(con)`` in order on its own connection to ``path``."""

    def __init__(self, path: Path, max_pending: int):
        self.path = path
        self.jobs: queue.Queue = queue.Queue(maxsize=max(1, int(max_pending)))  # back-pressure on the loop
        self.error: Optional[BaseException] = None
        self.thread = threading.Thread(target=self._loop, name="vitlens-bench-writer", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        con = None
        try:
            con = connect(self.path)
        except BaseException as e:  # noqa: BLE001 - reported to the main thread
            self.error = e
        while True:
            job = self.jobs.get()
            try:
                if job is None:
                    return
                if self.error is None and con is not None:
                    job(con)
            except BaseException as e:  # noqa: BLE001 - reported to the main thread; later jobs are dropped
                self.error = e
            finally:
                self.jobs.task_done()
                if job is None and con is not None:
                    con.close()

    def check(self) -> None:
        if self.error is not None:
            e = self.error
            raise StoreWriteError(f"writing to {self.path} failed: {type(e).__name__}: {e}") from e

    def submit(self, job: Callable[[sqlite3.Connection], None]) -> None:
        self.check()
        self.jobs.put(job)

    def flush(self) -> None:
        self.jobs.join()
        self.check()

    def stop(self) -> None:
        self.jobs.put(None)
        self.thread.join()


class Store:
    """A writable database (``path``) plus read-only databases whose committed work also counts as done.

    In a sharded run ``path`` is the shard's own file and ``also`` the merged ``results.sqlite``; in a
    single-process run both are the same file. See the module docstring for the background writer.
    """

    def __init__(self, path: Path, also: Sequence[Path] = ()):
        self.path = Path(path)
        self.con = connect(self.path)
        self.readers = [connect(p, readonly=True) for p in also if Path(p).exists() and Path(p) != self.path]
        self._writer: Optional[_Writer] = None
        self._lock = threading.Lock()
        self._pending_maps: dict[tuple[str, str], tuple[int, np.ndarray]] = {}  # queued, not yet committed
        self._pending_results: set[tuple[str, str, str, str]] = set()

    def start_writer(self, max_pending: int = 16) -> None:
        """Hand the per-batch writes to a background thread (at most ``max_pending`` queued batches)."""
        if self._writer is None:
            self._writer = _Writer(self.path, max_pending)

    def flush(self) -> None:
        """Wait until every queued write is committed (raises :class:`StoreWriteError` if one failed)."""
        if self._writer is not None:
            self._writer.flush()

    def _write(self, job: Callable[[sqlite3.Connection], None]) -> None:
        if self._writer is None:
            job(self.con)
        else:
            self._writer.submit(job)

    def close(self) -> None:
        try:
            if self._writer is not None:
                w, self._writer = self._writer, None
                try:
                    w.flush()
                finally:
                    w.stop()
        finally:
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

    def put_protocol(self, protocol_key: str, metric: str, protocol: dict, higher_is_better: bool,
                     base: Optional[str] = None) -> None:
        """``metric``: the label of the results' column; ``base``: the registered metric it runs."""
        with Transaction(self.con) as c:
            c.execute("INSERT OR IGNORE INTO protocols VALUES (?,?,?,?)",
                      (protocol_key, metric, canonical(protocol), int(bool(higher_is_better))))
            c.execute("INSERT OR REPLACE INTO metric_names VALUES (?, ?)", (metric, base or metric))

    def put_images(self, rows: Iterable[tuple]) -> None:
        with Transaction(self.con) as c:
            c.executemany("INSERT OR IGNORE INTO images VALUES (?,?,?,?,?)", list(rows))

    # -- maps ---------------------------------------------------------------------------------------
    def done_maps(self, run_key: str, image_ids: Sequence[str]) -> set[str]:
        with self._lock:
            out = {i for i in image_ids if (run_key, i) in self._pending_maps}
        q = f"SELECT image_id FROM maps WHERE run_key=? AND image_id IN ({','.join('?' * len(image_ids))})"
        for c in self._all():
            out.update(r[0] for r in c.execute(q, (run_key, *image_ids)))
        return out

    def put_maps(self, run_key: str, image_ids: Sequence[str], targets: Sequence[int], maps: np.ndarray,
                 seconds: float, version: str, dtype: str = "float16") -> None:
        now = time.time()
        ids, tgts = list(image_ids), [int(t) for t in targets[:len(image_ids)]]
        # the values exactly as they will read back (float16 round trip), owned by the store
        stored = [np.array(np.asarray(maps[i], dtype=np.dtype(dtype)), dtype=np.float32) for i in range(len(ids))]
        per = seconds / max(len(ids), 1)

        def job(con: sqlite3.Connection) -> None:
            rows = []
            for i, iid in enumerate(ids):
                blob, shape = encode_map(stored[i], dtype)
                rows.append((run_key, iid, tgts[i], shape, blob, per, version, now))
            with Transaction(con) as c:
                c.executemany("INSERT OR REPLACE INTO maps VALUES (?,?,?,?,?,?,?,?)", rows)
                c.executemany("DELETE FROM errors WHERE stage='method' AND run_key=? AND image_id=?",
                              [(run_key, iid) for iid in ids])
            if self._writer is not None:
                with self._lock:
                    for iid in ids:
                        self._pending_maps.pop((run_key, iid), None)

        if self._writer is not None:
            with self._lock:
                for iid, t, m in zip(ids, tgts, stored):
                    self._pending_maps[(run_key, iid)] = (t, m)
        self._write(job)

    def get_maps(self, run_key: str, image_ids: Sequence[str]) -> tuple[np.ndarray, list[int]]:
        """(n, H, W) float32 maps (decoded from float16) and targets, in the order of ``image_ids``."""
        found: dict[str, tuple] = {}
        with self._lock:
            for iid in image_ids:
                if (run_key, iid) in self._pending_maps:
                    found[iid] = self._pending_maps[(run_key, iid)]
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
        with self._lock:
            out = {i for i in image_ids if (run_key, metric, protocol_key, i) in self._pending_results}
        q = (f"SELECT image_id FROM results WHERE run_key=? AND metric=? AND protocol_key=? "
             f"AND image_id IN ({','.join('?' * len(image_ids))})")
        for c in self._all():
            out.update(r[0] for r in c.execute(q, (run_key, metric, protocol_key, *image_ids)))
        return out

    def put_results(self, rows: Sequence[dict]) -> None:
        now = time.time()
        # everything but the compression is built here (the caller's dicts and arrays may change later)
        vals = [[r["run_key"], r["image_id"], r["metric"], r["protocol_key"], r["model"], r["method"],
                 None if r["value"] is None or not np.isfinite(r["value"]) else float(r["value"]),
                 None if r.get("curve") is None else np.array(r["curve"], dtype=np.float32),
                 None if r.get("xs") is None else np.array(r["xs"], dtype=np.float32), int(r["target"]),
                 canonical(r["method_params"]), canonical(r["protocol"]), r["version"], r["seconds"], now]
                for r in rows]
        marks = [(r["run_key"], r["metric"], r["protocol_key"], r["image_id"]) for r in rows]

        def job(con: sqlite3.Connection) -> None:
            for v in vals:
                v[7], v[8] = encode_f32(v[7]), encode_f32(v[8])
            with Transaction(con) as c:
                c.executemany("INSERT OR REPLACE INTO results VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                              [tuple(v) for v in vals])
                c.executemany("DELETE FROM errors WHERE stage='metric' AND run_key=? AND image_id=? "
                              "AND protocol_key=?", [(v[0], v[1], v[3]) for v in vals])
            if self._writer is not None:
                with self._lock:
                    self._pending_results.difference_update(marks)

        if self._writer is not None:
            with self._lock:
                self._pending_results.update(marks)
        self._write(job)

    # -- errors -------------------------------------------------------------------------------------
    def put_errors(self, rows: Sequence[dict]) -> None:
        """Record failed work: dicts with image_id, stage (see ``STAGES``), run_key, metric, protocol_key,
        label, message, version (missing keys: "")."""
        now = time.time()
        vals = [(r["image_id"], r["stage"], r.get("run_key") or "", r.get("metric") or "",
                 r.get("protocol_key") or "", r.get("label") or "", str(r.get("message", ""))[:2000],
                 r.get("version") or "", now) for r in rows]

        def job(con: sqlite3.Connection) -> None:
            with Transaction(con) as c:
                c.executemany("INSERT OR REPLACE INTO errors VALUES (?,?,?,?,?,?,?,?,?)", vals)

        self._write(job)

    def clear_image_errors(self, image_ids: Sequence[str]) -> None:
        """The images were read successfully: drop their "image" error rows."""
        if not image_ids:
            return
        ids = [(i,) for i in image_ids]

        def job(con: sqlite3.Connection) -> None:
            with Transaction(con) as c:
                c.executemany("DELETE FROM errors WHERE stage='image' AND image_id=?", ids)

        self._write(job)

    # -- what is done (whole runs, for the start line) -------------------------------------------------
    def map_ids(self, run_key: str) -> set[str]:
        with self._lock:
            out = {i for (rk, i) in self._pending_maps if rk == run_key}
        for c in self._all():
            out.update(r[0] for r in c.execute("SELECT image_id FROM maps WHERE run_key=?", (run_key,)))
        return out

    def result_ids(self, run_key: str, metric: str, protocol_key: str) -> set[str]:
        with self._lock:
            out = {i for (rk, me, pk, i) in self._pending_results if (rk, me, pk) == (run_key, metric, protocol_key)}
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
