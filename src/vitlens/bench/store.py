"""The benchmark's SQLite store: maps, per-image metric rows, run descriptions and image metadata
(the tables, their migration and the durability settings: :mod:`.schema`; merging shard files:
:mod:`.shards`).

Keys: a *run key* hashes everything that determines a map (model, weights, model arguments, method,
its parameters, seed, target rule); a *protocol key* hashes a metric's full protocol (defaults filled
in). Rows are unique on ``(run_key, image_id, metric, protocol_key)``, so runs with different
parameters never mix, and merging shard files is an idempotent ``INSERT OR IGNORE``.

Maps are stored as zlib-compressed float16 arrays (the raw native-resolution maps of a run, under its run key
plus :data:`RAW_SUFFIX`, as float32); curves and the counts of pooled metrics as zlib-compressed float32.
A run key can be renamed in place (:meth:`Store.rename_run`: a folder of an earlier release resumes under
the key the current parameters give, see :mod:`.legacy_keys`).

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
from .schema import Transaction, connect

#: the folder's database (every shard merged into it)
MAIN_DB = "results.sqlite"
#: the ``results`` columns in the order :meth:`Store.put_results` writes them
RESULT_COLUMNS = ("run_key, image_id, metric, protocol_key, model, method, value, curve, xs, target, method_params, "
                  "protocol, version, seconds, created, counts")
#: run key suffix of the raw native-resolution maps (float32) in the maps table
RAW_SUFFIX = ":raw"


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


def _f32(a) -> Optional[np.ndarray]:
    return None if a is None else np.array(a, dtype=np.float32)


def decode_f32(blob: Optional[bytes]) -> Optional[np.ndarray]:
    return None if blob is None else np.frombuffer(zlib.decompress(blob), dtype=np.float32)


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
        self.also = [Path(p) for p in also if Path(p).exists() and Path(p) != self.path]
        self.readers = [connect(p, readonly=True) for p in self.also]
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
        """Metric rows: dicts with the ``results`` columns; ``curve``/``xs`` (a curve metric) and ``counts``
        (a pooled metric's per-image counts) are arrays or absent."""
        now = time.time()
        # everything but the compression is built here (the caller's dicts and arrays may change later)
        vals = [[r["run_key"], r["image_id"], r["metric"], r["protocol_key"], r["model"], r["method"],
                 None if r["value"] is None or not np.isfinite(r["value"]) else float(r["value"]),
                 _f32(r.get("curve")), _f32(r.get("xs")), int(r["target"]),
                 canonical(r["method_params"]), canonical(r["protocol"]), r["version"], r["seconds"], now,
                 _f32(r.get("counts"))] for r in rows]
        marks = [(r["run_key"], r["metric"], r["protocol_key"], r["image_id"]) for r in rows]

        def job(con: sqlite3.Connection) -> None:
            for v in vals:
                v[7], v[8], v[15] = encode_f32(v[7]), encode_f32(v[8]), encode_f32(v[15])
            with Transaction(con) as c:
                c.executemany(f"INSERT OR REPLACE INTO results ({RESULT_COLUMNS}) VALUES ({','.join('?' * 16)})",
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

    # -- run keys of earlier releases (see .legacy_keys) ----------------------------------------------------
    def has_run(self, run_key: str) -> bool:
        """Whether any of the databases describes run ``run_key``."""
        return any(c.execute("SELECT 1 FROM runs WHERE run_key=?", (run_key,)).fetchone() for c in self._all())

    def runs_of(self, method: str) -> dict[str, dict]:
        """run key -> stored parameters of every run of ``method`` in the databases."""
        out: dict[str, dict] = {}
        for c in self._all():
            for k, p in c.execute("SELECT run_key, method_params FROM runs WHERE method=?", (method,)):
                out.setdefault(k, json.loads(p))
        return out

    def rename_run(self, old: str, new: str, params: dict, label: Optional[str] = None) -> int:
        """Give run ``old`` the key ``new`` (and its raw maps ``new + RAW_SUFFIX``) in ``runs``, ``maps``,
        ``results`` and ``errors`` of every database holding it, one transaction per database, and record
        ``params`` as its parameters (and ``label`` as its label). Rows already stored under ``new`` win
        over ``old``'s copies of the same work. Returns the number of maps renamed (raw maps not counted).
        Call it before any write of the run."""
        self.flush()
        n = 0
        for path in [self.path, *self.also]:
            con = self.con if path == self.path else connect(path)
            try:
                with Transaction(con) as c:
                    if not c.execute("SELECT 1 FROM runs WHERE run_key=?", (old,)).fetchone():
                        continue
                    n += c.execute("SELECT COUNT(*) FROM maps WHERE run_key=?", (old,)).fetchone()[0]
                    for table in ("runs", "maps", "results", "errors"):
                        pairs = [(old, new)] + ([(old + RAW_SUFFIX, new + RAW_SUFFIX)] if table == "maps" else [])
                        for o, k in pairs:
                            c.execute(f"UPDATE OR IGNORE {table} SET run_key=? WHERE run_key=?", (k, o))
                            c.execute(f"DELETE FROM {table} WHERE run_key=?", (o,))
                    for table, col in (("runs", "label"), ("results", "method")):
                        c.execute(f"UPDATE {table} SET method_params=?, {col}=coalesce(?, {col}) WHERE run_key=?",
                                  (canonical(params), label, new))
            finally:
                if con is not self.con:
                    con.close()
        return n
