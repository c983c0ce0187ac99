"""The bench under real-world conditions (issue 12 items 4-6): progress and ETA, one runner per folder,
bad data recorded and skipped, and a report that explains itself (intervals inside the metric's range,
class names, boxes, protocol), checked in headless Chromium where it is installed."""
from __future__ import annotations

import io
import json
import math
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import SHARED

DATA = SHARED / "data" / "imagenet-val-sample"
needs_shared = pytest.mark.skipif(not DATA.is_dir(), reason=f"shared images not found at {DATA}")


# ------------------------------------------------------------------------------------------- intervals
def _wilson_by_inversion(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Reference: the Wilson interval is the set of p0 the score test does not reject,
    |k/n - p0| <= z sqrt(p0 (1 - p0) / n); its end points are the roots of the squared condition."""
    from scipy.optimize import brentq

    p = k / n

    def f(p0):
        return (p - p0) ** 2 - z * z * p0 * (1 - p0) / n

    # f <= 0 between the roots and f(p) = -z^2 p (1-p) / n; at p = 0 or 1, p itself is one root
    lo = 0.0 if k == 0 else brentq(f, 0.0, p - (1e-12 if k == n else 0.0), xtol=1e-14)
    hi = 1.0 if k == n else brentq(f, p + (1e-12 if k == 0 else 0.0), 1.0, xtol=1e-14)
    return lo, hi


@pytest.mark.parametrize("k,n", [(0, 10), (10, 10), (3, 10), (1, 1), (57, 200), (199, 200)])
def test_wilson_interval_equals_the_inverted_score_test(k, n):
    from vitlens.bench.stats import wilson

    lo, hi = wilson(k, n)
    rlo, rhi = _wilson_by_inversion(k, n)
    # closed form vs root finding (xtol 1e-14) in float64: agreement to 1e-12
    assert math.isclose(lo, rlo, abs_tol=1e-12) and math.isclose(hi, rhi, abs_tol=1e-12)
    assert 0.0 <= lo <= k / n <= hi <= 1.0


def test_intervals_stay_inside_the_metric_range_and_say_which_rule():
    from vitlens.bench.stats import interval_label, metric_ci

    hits = [1.0, 1.0, 1.0, 0.0, float("nan"), 1.0]  # the case: t on 0/1 values exceeds 1
    c = metric_ci(hits, "pointing_game", {"variant": "hit"})
    assert c.kind == "wilson" and c.n == 5 and c.hi <= 1.0 and (c.lo, c.hi) == pytest.approx(
        _wilson_by_inversion(4, 5), abs=1e-12)
    assert "Wilson" in interval_label(c.kind, "pointing_game", {"variant": "hit"})

    ins = [0.99, 1.0, 0.95, 1.0]
    c = metric_ci(ins, "insertion", {"score": "prob"})
    v = np.array(ins)
    half = 3.182446 * v.std(ddof=1) / 2.0  # t_{0.975, 3}, s / sqrt(4)
    assert c.kind == "t-clipped" and c.hi == 1.0 and math.isclose(c.lo, v.mean() - half, rel_tol=1e-6)
    assert v.mean() + half > 1.0  # the clip did something
    assert interval_label(c.kind, "insertion", {"score": "prob"}) == "Student t, clipped to [0, 1]"

    c = metric_ci(ins, "insertion", {"score": "logit"})  # logits: unbounded, plain t
    assert c.kind == "t" and math.isclose(c.hi, v.mean() + half, rel_tol=1e-6)
    c = metric_ci([0.01, 0.02, 0.9], "max_sensitivity", {})  # >= 0 only
    assert c.kind == "t-clipped" and c.lo == 0.0 and c.hi > 0.9
    c = metric_ci([1.5, 0.2, 0.4], "sparseness", {})  # outside the declared range: no clipping
    assert c.kind == "t"
    assert metric_ci([0.3, 0.4], "energy", {}).kind == "t"  # unknown metric: plain t


# ----------------------------------------------------------------------------------------------- locks
@pytest.fixture
def live_pid():
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield p.pid
    p.kill()
    p.wait()


def _write_lock(path: Path, **info) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dict(dict(host=socket.gethostname(), started=time.time(), argv=[]), **info)))


def test_lock_refuses_a_live_owner_and_removes_a_stale_one(tmp_path, live_pid):
    from vitlens.bench.lock import LockedError, RunLock, _proc_start

    path = tmp_path / "bench.lock"
    _write_lock(path, pid=live_pid, boot=_proc_start(live_pid))
    with pytest.raises(LockedError, match=f"pid {live_pid} on host {socket.gethostname()}"):
        RunLock(path).acquire()

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _write_lock(path, pid=dead.pid)
    said = []
    with RunLock(path, log=said.append):
        assert json.loads(path.read_text())["pid"] == os.getpid()
    assert not path.exists() and "stale lock" in said[0]

    _write_lock(path, pid=live_pid, boot="1")  # the pid is alive but is another process (reused pid)
    with RunLock(path, log=said.append):
        pass
    assert "stale lock" in said[-1]

    _write_lock(path, pid=live_pid, host="another-host")  # cannot be checked from here
    with pytest.raises(LockedError, match=f"delete {path}"):
        RunLock(path).acquire()


def test_folder_and_shard_locks_exclude_each_other_but_shards_coexist(tmp_path):
    from vitlens.bench.lock import LockedError, RunLock, lock_paths

    with RunLock(*lock_paths(tmp_path, ".shard-0-of-2")), RunLock(*lock_paths(tmp_path, ".shard-1-of-2")):
        with pytest.raises(LockedError, match="conflicting run"):
            RunLock(*lock_paths(tmp_path, "")).acquire()
    with RunLock(*lock_paths(tmp_path, "")):
        with pytest.raises(LockedError, match="conflicting run"):
            RunLock(*lock_paths(tmp_path, ".shard-1-of-2")).acquire()
        with pytest.raises(LockedError, match="another vitlens bench run"):
            RunLock(*lock_paths(tmp_path, "")).acquire()
    assert not list(tmp_path.rglob("*.lock"))


@needs_shared
def test_a_second_runner_on_the_same_folder_is_refused_with_one_line(tmp_path, live_pid, capsys):
    from vitlens.bench.cli import main
    from vitlens.bench.lock import _proc_start

    out = tmp_path / "run"
    _write_lock(out / "bench.lock", pid=live_pid, boot=_proc_start(live_pid))
    rc = main(["--model", "vit_tiny_patch16_224", "--weights", "random", "--data", str(DATA), "--methods",
               "rollout", "--metrics", "sparseness", "--limit", "1", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and f"pid {live_pid}" in err[0] and str(out) in err[0]
    assert not (out / "results.sqlite").exists()  # refused before touching anything


# -------------------------------------------------------------------------------------------- progress
def test_eta_is_the_remaining_work_at_the_measured_rates_times_the_overhead(monkeypatch):
    import vitlens.bench.progress as pg

    clock = [100.0]
    monkeypatch.setattr(pg.time, "perf_counter", lambda: clock[0])
    p = pg.BenchProgress({"a": 4, "b": 4}, {"a": 1, "b": 0}, {("m", "a"): 4, ("m", "b"): 4},
                         {("m", "a"): 1, ("m", "b"): 0}, enabled=False)
    assert p.start_line() == "resuming: 1 of 8 maps, 1 of 8 rows done"
    assert p.eta() == (None, False)
    clock[0] = 104.0
    p.end(("map", "a"), "maps a", 2, 2.0)  # 1 s per image; wall 4 s for 2 s of compute
    assert p.eta() == (None, False)  # no metric timed yet
    clock[0] = 106.0
    p.end(("row", "m", "a"), "m a", 2, 1.0)  # 0.5 s per image; wall 6 s for 3 s of compute
    # remaining: maps a 1 x 1 s, maps b 4 x 1 s (borrowed), rows (m,a) 1 x 0.5 s, rows (m,b) 4 x 0.5 s (borrowed)
    eta, exact = p.eta()
    assert not exact and eta == pytest.approx((1 + 4 + 0.5 + 2.0) * 6.0 / 3.0)
    assert p.counts() == "maps 3/8, rows 3/8"
    p.end(("map", "b"), "maps b", 4, 8.0)  # 2 s per image: measured now
    clock[0] = 120.0
    p.end(("row", "m", "b"), "m b", 4, 1.0)
    p.skip(("map", "a"), 1)  # e.g. an unreadable image
    eta, exact = p.eta()
    assert exact and eta == pytest.approx(1 * 0.5 * 20.0 / 12.0)


def test_non_terminal_output_has_a_line_per_call_and_a_heartbeat_during_long_calls():
    from vitlens.bench.progress import BenchProgress

    buf = io.StringIO()
    p = BenchProgress({"tis": 8}, {"tis": 0}, {}, {}, enabled=True, interval=0.3, stream=buf)
    p.begin("maps tis", 8, "img_001")
    time.sleep(1.6)  # the heartbeat thread wakes every min(1, interval / 3) s
    p.end(("map", "tis"), "maps tis", 8, 1.6)
    p.close()
    lines = buf.getvalue().splitlines()
    beats = [ln for ln in lines if "working: maps tis on 8 images (from img_001)" in ln]
    assert len(beats) >= 2, lines
    assert "maps tis: 8 images in 1.60 s (5 img/s) | done: maps 8/8, rows 0/0 | ETA 0s" in lines[-1]


# ---------------------------------------------------------------------------------- bad data, report
def _flaky_factory(bad_pixel: torch.Tensor):
    """rollout, but raises on any batch that holds the image whose top-left pixel is ``bad_pixel``."""
    from vitlens.methods.base import get_method

    rollout = get_method("rollout").fn

    def flaky(adapter, x, target=None, *, seed=0, batch_size=None, progress=None):
        if any(torch.equal(x[i, :, 0, 0], bad_pixel) for i in range(x.shape[0])):
            raise ValueError("synthetic failure on this image")
        return rollout(adapter, x, target, seed=seed, batch_size=batch_size, progress=progress)

    return flaky


def _make_data(root: Path, n_good: int = 3) -> list[str]:
    """An ImageNet-layout folder: ``n_good`` shared images (symlinks), then a truncated JPEG (its header
    reads, its pixels do not) and a file that is no image at all (not even its size can be read)."""
    (root / "images").mkdir(parents=True)
    for f in ("LOC_val_solution.csv", "LOC_synset_mapping.txt"):
        shutil.copy(DATA / f, root / f)
    files = sorted((DATA / "images").iterdir())[: n_good + 2]
    for f in files[:n_good]:
        (root / "images" / f.name).symlink_to(f)
    (root / "images" / files[n_good].name).write_bytes(files[n_good].read_bytes()[:2000])  # truncated
    (root / "images" / files[n_good + 1].name).write_bytes(b"not an image")
    return [f.stem for f in files]


@pytest.fixture(scope="module")
def bad_run(tmp_path_factory):
    """One run over 3 good images + 2 unreadable ones, with a method that raises on the second image."""
    if not DATA.is_dir():
        pytest.skip(f"shared images not found at {DATA}")
    import vitlens
    from vitlens.bench import BenchConfig, run_bench
    from vitlens.methods import base as mbase

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("bad")
    ids = _make_data(root / "data")
    model = vitlens.load_model("vit_tiny_patch16_224", weights="random", img_size=64, depth=2)
    from vitlens.bench.datasets import load_images

    x1 = load_images(model, [root / "data" / "images" / f"{ids[1]}.JPEG"])  # as the runner decodes it
    info = mbase.MethodInfo("_flaky_test", _flaky_factory(x1[0, :, 0, 0].clone()), mbase.MethodKind.ATTENTION, True,
                            "test", {})
    mbase.REGISTRY.add(info)
    cfg = BenchConfig(out=str(root / "out"), model="vit_tiny_patch16_224", weights="random",
                      model_args=dict(img_size=64, depth=2), data=str(root / "data"),
                      methods={"rollout": {}, "flaky": {"method": "_flaky_test"}},
                      metrics=["insertion", "pointing_game"], metric_params={"insertion": {"n_steps": 4}},
                      batch_size=4, examples=3, progress=False)
    try:
        summary = run_bench(cfg)
        yield root, ids, cfg, summary
    finally:
        mbase.REGISTRY.remove("_flaky_test")


def _q(db: Path, sql: str) -> list:
    con = sqlite3.connect(str(db))
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


@needs_shared
def test_bad_image_and_failing_method_are_recorded_and_the_rest_completes(bad_run):
    root, ids, cfg, summary = bad_run
    db = root / "out" / "results.sqlite"
    errs = sorted(_q(db, "SELECT stage, image_id, label FROM errors"))
    assert errs == [("image", ids[3], ""), ("image", ids[4], ""), ("method", ids[1], "flaky")]
    assert sorted((e["stage"], e["image_id"]) for e in summary["errors"]) == [
        ("image", ids[3]), ("image", ids[4]), ("method", ids[1])]
    # rollout: 3 maps; flaky: the 2 images it does not fail on, found by retrying the batch image by image
    maps = _q(db, "SELECT r.label, m.image_id, m.map FROM maps m JOIN runs r USING (run_key) ORDER BY 1, 2")
    assert [(lb, i) for lb, i, _ in maps] == [("flaky", ids[0]), ("flaky", ids[2]),
                                              ("rollout", ids[0]), ("rollout", ids[1]), ("rollout", ids[2])]
    by = {(lb, i): blob for lb, i, blob in maps}
    assert by[("flaky", ids[0])] == by[("rollout", ids[0])] and by[("flaky", ids[2])] == by[("rollout", ids[2])]
    assert summary["maps"] == 5 and summary["rows"] == 10  # 5 maps x 2 metrics
    md = (root / "out" / "results.md").read_text()
    assert "## Errors (3)" in md and ids[3] in md and ids[4] in md and "synthetic failure on this image" in md


@needs_shared
def test_failed_work_is_retried_and_resolved_when_it_succeeds(bad_run, tmp_path):
    from vitlens.bench import BenchConfig, run_bench
    from vitlens.methods import base as mbase

    root, ids, cfg, _ = bad_run
    db = root / "out" / "results.sqlite"
    work = tmp_path / "copy"
    shutil.copytree(root / "out", work / "out")
    shutil.copytree(root / "data", work / "data", symlinks=True)
    bad = work / "data" / "images" / f"{ids[3]}.JPEG"
    bad.unlink()
    bad.symlink_to(DATA / "images" / f"{ids[3]}.JPEG")  # the user fixes the file
    cfg2 = BenchConfig(**{**cfg.__dict__, "out": str(work / "out"), "data": str(work / "data"),
                          "methods": {"rollout": {}}, "report_subset": True})
    s = run_bench(cfg2)
    assert s["maps"] == 1 and s["rows"] == 2 and [(e["stage"], e["image_id"]) for e in s["errors"]] == [
        ("image", ids[4])]
    db2 = work / "out" / "results.sqlite"
    # the fixed image is computed and its error row resolved; the other unreadable one is retried and still fails
    assert sorted(_q(db2, "SELECT stage, image_id FROM errors")) == [("image", ids[4]), ("method", ids[1])]
    # results.md keeps every run of the folder; the subset view has this run's entries only
    assert "| flaky |" in (work / "out" / "results.md").read_text()
    sub = (work / "out" / "this-run" / "results.md").read_text()
    assert "| rollout |" in sub and "| flaky |" not in sub
    assert len(_q(db, "SELECT * FROM errors")) == 3  # the original folder is untouched
    assert "_flaky_test" in mbase.REGISTRY


@needs_shared
def test_report_states_protocol_classes_and_parameters(bad_run):
    root, ids, cfg, _ = bad_run
    md = (root / "out" / "results.md").read_text()
    html = (root / "out" / "report.html").read_text()
    for text in (md, html):
        assert "Protocol" in text and "Wilson score interval" in text and "clipped to [0, 1]" in text
        assert "n_steps=4" in text and 'auc="trapezoid over xs"' in text.replace("&quot;", '"')
        assert 'head_fusion="mean"' in text.replace("&quot;", '"')  # a method's full parameters
        assert "random" in text and "64x64" in text  # weights identity and input
    assert "±" not in md  # intervals are [lo, hi], not symmetric
    from vitlens.bench.figures import class_name

    names = [ln.split(" ", 1)[1] for ln in (DATA / "LOC_synset_mapping.txt").read_text().splitlines()]
    row = _q(root / "out" / "results.sqlite", f"SELECT label FROM images WHERE image_id='{ids[0]}'")[0][0]
    assert class_name(names, row) == names[row].split(",")[0]
    stored = json.loads(_q(root / "out" / "results.sqlite", "SELECT value FROM meta WHERE key='class_names'")[0][0])
    assert stored == names


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if shutil.which(name):
            return shutil.which(name)
    return None


@pytest.fixture(scope="module")
def chromium():
    exe = _chromium()
    if exe is None:
        pytest.skip("headless Chromium not installed (Debian: apt-get install -y chromium)")
    return exe


@needs_shared
def test_report_html_renders_in_headless_chromium(bad_run, chromium, tmp_path):
    from PIL import Image

    root, ids, _, _ = bad_run
    page = root / "out" / "report.html"
    shot = Path(os.environ.get("VITLENS_REPORT_SCREENSHOT", tmp_path / "report.png"))
    args = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1200,2400"]
    r = subprocess.run(args + [f"--screenshot={shot}", page.as_uri()], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and shot.exists(), r.stderr[-2000:]
    dom = subprocess.run(args + ["--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120).stdout
    for h in ("Results", "Errors (3)", "Mean curves", "Examples", "Protocol"):
        assert f">{h}</h2>" in dom, h
    assert dom.count("data:image/png;base64,") == 2
    im = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert im.shape[:2] == (2400, 1200)
    # the example heatmaps (jet colour map) are drawn: strongly saturated pixels cover part of the page
    # (text and tables are grey: without the figures under 0.5 % of the page is this colourful)
    coloured = (im.max(-1) - im.min(-1)) > 80
    assert coloured.mean() > 0.02, coloured.mean()
    rows_used = np.nonzero((im < 250).any(-1).any(-1))[0]
    assert rows_used.max() > 1500  # the page is long: results, errors, curves, examples, protocol


def test_report_intervals_follow_the_metric_a_label_runs(tmp_path):
    """A column labelled ``pg_alias`` (= pointing_game) gets the Wilson interval of a hit rate, and
    ``sparseness_paper`` the t interval clipped to [0, 1]: the label is resolved to the registered metric
    (stored in ``metric_names``; for folders written before that table, by the label's prefix)."""
    from vitlens.bench.tables import build_table
    from vitlens.bench.store import Store

    st = Store(tmp_path / "r.sqlite")
    st.put_run("rk", label="m", model="x", weights="w", method="rollout", method_params={}, target_rule="label",
               seed=0, model_info={}, version="v")
    st.put_protocol("pk1", "pg_alias", {"variant": "hit"}, True, base="pointing_game")
    st.put_protocol("pk2", "sparseness_paper", {"protocol": "default"}, True, base="sparseness")
    hits = [1, 1, 1, 0, 1, 1, 1, 1]
    sp = [1.0, 0.6, 1.0, 1.0, 0.7, 1.0, 1.0, 0.95]
    from vitlens.bench.stats import mean_ci

    assert mean_ci(np.array(sp)).hi > 1.0  # the plain t interval would pass the range's end
    rows = [dict(run_key="rk", image_id=f"i{k}", metric=lb, protocol_key=pk, model="x", method="m", value=v,
                 curve=None, xs=None, target=0, method_params={}, protocol={}, version="v", seconds=0.0)
            for lb, pk, vals in (("pg_alias", "pk1", hits), ("sparseness_paper", "pk2", sp))
            for k, v in enumerate(vals)]
    st.put_results(rows)
    st.close()
    con = sqlite3.connect(str(tmp_path / "r.sqlite"))
    t = build_table(con)
    assert t.cells[("m", "pg_alias")].kind == "wilson" and t.col_metric["pg_alias"] == "pointing_game"
    c = t.cells[("m", "sparseness_paper")]
    assert c.kind == "t-clipped" and c.hi == 1.0
    con.execute("DELETE FROM metric_names")  # a folder from before the table: prefix rule
    con.commit()
    t2 = build_table(con)
    assert t2.col_metric["sparseness_paper"] == "sparseness" and t2.cells[("m", "sparseness_paper")].hi == 1.0
    assert t2.col_metric["pg_alias"] == "pg_alias" and t2.cells[("m", "pg_alias")].kind == "t"  # unknown: plain t
