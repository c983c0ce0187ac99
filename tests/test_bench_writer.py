"""The bench store's background writer (issue 15 item 6): what the loop reads back while a write is still
queued equals what a synchronous store returns, the committed databases are identical, ordering and
"done" marks hold, and a failed write surfaces in the main thread as one clear error."""
from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from vitlens.bench import store as store_mod
from vitlens.bench.store import Store, StoreWriteError

from conftest import SHARED

DATA = SHARED / "data" / "imagenet-val-sample"


def _rows(db: Path, sql: str) -> list:
    con = sqlite3.connect(str(db))
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def _put_all(st: Store, maps: np.ndarray, raw: np.ndarray, curves: np.ndarray) -> None:
    ids = ["a", "b", "c"]
    st.put_maps("rk", ids, [1, 2, 3], maps, 3.0, "v1")
    st.put_maps("rk:raw", ids, [1, 2, 3], raw, 0.0, "v1", dtype="float32")
    st.put_errors([dict(image_id="c", stage="metric", run_key="rk", metric="ins", protocol_key="pk",
                        message="boom")])
    st.put_results([dict(run_key="rk", image_id=i, metric="ins", protocol_key="pk", model="m", method="x",
                         value=float(curves[j].mean()), curve=curves[j], xs=np.linspace(0, 1, 5), target=j,
                         method_params={"a": 1}, protocol={"p": 2}, version="v1", seconds=0.5)
                    for j, i in enumerate(ids[:2])])


def test_pending_writes_read_back_exactly_and_commit_identically(tmp_path):
    rng = np.random.default_rng(0)
    maps = rng.random((3, 8, 8)).astype(np.float32)  # most values are not float16-representable
    raw = rng.standard_normal((3, 4, 4)).astype(np.float32)
    curves = rng.random((2, 5)).astype(np.float32)

    sync = Store(tmp_path / "sync.sqlite")
    _put_all(sync, maps, raw, curves)

    bg = Store(tmp_path / "bg.sqlite")
    bg.start_writer()
    gate = threading.Event()
    bg._write(lambda con: gate.wait(timeout=60))  # hold the writer so that everything below is pending
    _put_all(bg, maps, raw, curves)
    ids = ["a", "b", "c"]
    # nothing is committed yet ...
    assert _rows(tmp_path / "bg.sqlite", "SELECT COUNT(*) FROM maps") == [(0,)]
    # ... but the loop sees it as done, and reads the maps exactly as a committed store returns them
    assert bg.done_maps("rk", ids) == set(ids) and bg.map_ids("rk:raw") == set(ids)
    assert bg.done_results("rk", "ins", "pk", ids) == {"a", "b"} == bg.result_ids("rk", "ins", "pk")
    for rk in ("rk", "rk:raw"):
        m_bg, t_bg = bg.get_maps(rk, ["c", "a"])
        m_sync, t_sync = sync.get_maps(rk, ["c", "a"])
        assert t_bg == t_sync == [3, 1]
        np.testing.assert_array_equal(m_bg, m_sync)  # the same float16 (or float32) round trip: bit equal
    np.testing.assert_array_equal(bg.get_maps("rk", ["a"])[0], maps[:1].astype(np.float16).astype(np.float32))
    maps[:] = 0  # the caller's arrays may be reused: the store owns its copies
    gate.set()
    bg.flush()
    assert not bg._pending_maps and not bg._pending_results
    np.testing.assert_array_equal(bg.get_maps("rk", ["c", "a"])[0], sync.get_maps("rk", ["c", "a"])[0])
    bg.close()
    sync.close()
    for sql in ("SELECT run_key, image_id, target, shape, map, seconds, version FROM maps ORDER BY 1, 2",
                "SELECT run_key, image_id, metric, protocol_key, value, curve, xs, target, method_params, protocol "
                "FROM results ORDER BY 2",
                "SELECT image_id, stage, run_key, metric, protocol_key, message FROM errors"):
        assert _rows(tmp_path / "bg.sqlite", sql) == _rows(tmp_path / "sync.sqlite", sql)
    assert len(_rows(tmp_path / "bg.sqlite", "SELECT * FROM results")) == 2


def test_writes_keep_their_order(tmp_path):
    """An error row put before a successful result for the same work is cleared by it (FIFO, as synchronous)."""
    st = Store(tmp_path / "s.sqlite")
    st.start_writer(max_pending=1)
    for k in range(20):  # more writes than the queue holds: back-pressure, no loss
        st.put_errors([dict(image_id=f"i{k}", stage="metric", run_key="rk", metric="ins", protocol_key="pk")])
        st.put_results([dict(run_key="rk", image_id=f"i{k}", metric="ins", protocol_key="pk", model="m",
                             method="x", value=0.5, curve=None, xs=None, target=0, method_params={}, protocol={},
                             version="v", seconds=0.0)])
    st.close()
    assert _rows(tmp_path / "s.sqlite", "SELECT COUNT(*) FROM errors") == [(0,)]
    assert _rows(tmp_path / "s.sqlite", "SELECT COUNT(*) FROM results") == [(20,)]


def test_a_failed_background_write_is_raised_in_the_main_thread(tmp_path, monkeypatch):
    def broken(m, dtype="float16"):
        raise OSError("No space left on device")

    st = Store(tmp_path / "s.sqlite")
    st.start_writer()
    monkeypatch.setattr(store_mod, "encode_map", broken)
    st.put_maps("rk", ["a"], [0], np.zeros((1, 2, 2), np.float32), 0.0, "v")
    with pytest.raises(StoreWriteError, match=r"s\.sqlite failed: OSError: No space left on device"):
        st.flush()
    with pytest.raises(StoreWriteError):  # every later write is refused, nothing is silently dropped
        st.put_maps("rk", ["b"], [0], np.zeros((1, 2, 2), np.float32), 0.0, "v")
    with pytest.raises(StoreWriteError):
        st.close()
    assert _rows(tmp_path / "s.sqlite", "SELECT COUNT(*) FROM maps") == [(0,)]  # nothing half-written


@pytest.mark.skipif(not DATA.is_dir(), reason=f"shared images not found at {DATA}")
def test_bench_with_and_without_the_writer_stores_the_same_rows(tmp_path, monkeypatch):
    from vitlens.bench import BenchConfig, run_bench

    torch.set_num_threads(1)
    out = {}
    for flag in ("0", "1"):
        monkeypatch.setenv("VITLENS_BENCH_WRITER", flag)
        cfg = BenchConfig(out=str(tmp_path / flag), model="vit_tiny_patch16_224", weights="random",
                          model_args=dict(img_size=64, depth=2), data=str(DATA), limit=4, batch_size=2,
                          methods={"rollout": {}, "rise": {"n_masks": 8}},
                          metrics=["insertion", "pointing_game"], metric_params={"insertion": {"n_steps": 4}},
                          report=False, progress=False)
        s = run_bench(cfg)
        assert s["maps"] == 8 and s["rows"] == 16
        db = tmp_path / flag / "results.sqlite"
        out[flag] = (_rows(db, "SELECT run_key, image_id, target, map FROM maps ORDER BY 1, 2"),
                     _rows(db, "SELECT run_key, image_id, metric, value, curve FROM results ORDER BY 1, 2, 3"))
    assert out["0"] == out["1"]  # same seeds, same calls: bit-identical maps and values
