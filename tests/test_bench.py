"""``vitlens bench`` / ``vitlens report``: end-to-end on shared images, crash + resume, torchrun sharding,
store merging, statistics and configuration."""
from __future__ import annotations

import json
import math
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REAL_MODEL, SHARED, kill_when_rows_appear

DATA = SHARED / "data" / "imagenet-val-sample"
PY = sys.executable
TORCHRUN = str(Path(PY).parent / "torchrun")
ENV = dict(os.environ, VITLENS_NO_PROGRESS="1", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")

needs_shared = pytest.mark.skipif(not DATA.is_dir(), reason=f"shared images not found at {DATA}")


def rows_of(db: Path) -> dict:
    """(run_key, image_id, metric, protocol_key) -> (value, curve bytes) of every result row."""
    con = sqlite3.connect(str(db))
    try:
        return {tuple(r[:4]): (r[4], r[5]) for r in
                con.execute("SELECT run_key, image_id, metric, protocol_key, value, curve FROM results")}
    finally:
        con.close()


def same_rows(a: dict, b: dict, atol: float = 0.0) -> None:
    assert set(a) == set(b)
    for k in a:
        va, vb = a[k][0], b[k][0]
        if va is None or vb is None:
            assert va is None and vb is None, k
        else:
            assert math.isclose(va, vb, rel_tol=0, abs_tol=atol), (k, va, vb)


# ------------------------------------------------------------------------------ tiny-model subprocess runs
TINY_ARGS = ["--model", "vit_tiny_patch16_224", "--weights", "random", "--model-arg", "img_size=64",
             "--model-arg", "depth=2", "--data", str(DATA), "--methods", "tis,rollout",
             "--method-param", "tis.n_masks=64", "--metrics", "insertion,deletion,pointing_game",
             "--metric-param", "insertion.n_steps=16", "--metric-param", "deletion.n_steps=16",
             "--target", "predicted", "--limit", "6", "--batch-size", "1", "--threads", "1", "--no-report"]


def bench(out: Path, *extra: str, launcher=None, **kw) -> subprocess.Popen:
    cmd = (launcher or [PY, "-m"]) + ["vitlens.bench", *TINY_ARGS, "--out", str(out), *extra]
    return subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """An uninterrupted 1-process run of the tiny configuration."""
    if not DATA.is_dir():
        pytest.skip(f"shared images not found at {DATA}")
    out = tmp_path_factory.mktemp("ref")
    p = bench(out)
    log, _ = p.communicate(timeout=300)
    assert p.returncode == 0, log
    rows = rows_of(out / "results.sqlite")
    assert len(rows) == 6 * 2 * 3
    assert "starting: 12 maps and 36 rows to compute" in log
    assert not list(out.rglob("*.lock")), "the run lock is released at the end"
    return out, rows


@needs_shared
def test_kill9_midway_then_resume_gives_exactly_the_uninterrupted_rows(reference_run, tmp_path):
    _, ref = reference_run
    out = tmp_path / "crash"
    p = bench(out)
    db = out / "results.sqlite"
    killed_at = kill_when_rows_appear(p, db, poll=0.02)
    p.communicate(timeout=60)
    assert killed_at is not None and p.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    partial = rows_of(db)
    assert 0 < len(partial) < len(ref)  # killed midway; what was committed survived
    same_rows({k: partial[k] for k in partial}, {k: ref[k] for k in partial})
    con = sqlite3.connect(str(db))
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    con.close()
    p = bench(out)  # resume is the default when the folder exists
    log, _ = p.communicate(timeout=300)
    assert p.returncode == 0, log
    same_rows(rows_of(db), ref)
    assert "computed" in log and f"{len(ref) - len(partial)} rows" in log
    # the killed runner's lock is detected as stale; the start line says what was found
    assert "removing a stale lock" in log and f"{len(partial)} of {len(ref)} rows done" in log
    assert not (out / "bench.lock").exists()


@needs_shared
def test_torchrun_two_gloo_processes_match_one_process(reference_run, tmp_path):
    ref_out, ref = reference_run
    out = tmp_path / "ddp"
    p = bench(out, launcher=[TORCHRUN, "--standalone", "--nproc_per_node=2", "-m"])
    log, _ = p.communicate(timeout=400)
    assert p.returncode == 0, log
    assert not list((out / "shards").glob("*.sqlite")), "rank 0 must merge and remove the shard files"
    got = rows_of(out / "results.sqlite")
    same_rows(got, ref, atol=0.0)  # same batch-mates in every process -> identical numbers
    logs = sorted(p.name for p in (out / "logs").iterdir())
    assert logs == ["bench.shard-0-of-2.log", "bench.shard-1-of-2.log"]
    assert not list(out.rglob("*.lock"))  # one lock per rank's shard, each released


@needs_shared
def test_manual_shards_then_report_merge_to_the_reference_rows(reference_run, tmp_path, capsys):
    from vitlens.bench.cli import main

    _, ref = reference_run
    out = tmp_path / "manual"
    for i in range(2):
        assert main([*TINY_ARGS, "--shard", f"{i}/2", "--out", str(out)]) == 0
    assert not (out / "results.sqlite").exists()
    assert len(list((out / "shards").glob("results.shard-*-of-2.sqlite"))) == 2
    assert main(["report", str(out)]) == 0
    same_rows(rows_of(out / "results.sqlite"), ref)
    assert "rollout" in (out / "results.md").read_text()
    # a later unsharded run counts the shards' work as done
    assert main([*TINY_ARGS, "--out", str(out)]) == 0
    assert "computed 0 maps and 0 rows" in capsys.readouterr().out


# ------------------------------------------------------------------------- end to end on the real ViT-Ti
@pytest.mark.integration
def test_end_to_end_three_methods_on_ten_shared_images(real_model, shared_pointing, tmp_path):
    import vitlens
    from vitlens.bench import BenchConfig, run_bench, write_report
    from vitlens.metrics import pointing_hits
    from vitlens.metrics.base import get_metric

    torch.set_num_threads(1)
    avail = vitlens.methods()
    cheap = [m for m in ("rollout", "raw_attention", "attention", "legrad", "gradcam") if m in avail]
    methods = {"tis": {"n_masks": 32}}
    for m in cheap[:2]:
        methods[m] = {}
    if len(methods) < 3:  # until more methods land: compare two TIS settings
        methods["tis-16"] = {"method": "tis", "n_masks": 16}
    steps = dict(insertion={"n_steps": 4}, deletion={"n_steps": 4})
    cfg = BenchConfig(out=str(tmp_path / "e2e"), model=REAL_MODEL, weights=str(SHARED / "models"), data=str(DATA),
                      methods=methods, metrics=["insertion", "deletion", "pointing_game"], metric_params=steps,
                      limit=10, max_box_fraction=0.5, batch_size=10, examples=2)
    summary = run_bench(cfg)
    assert summary["maps"] == 30 and summary["rows"] == 90
    db = tmp_path / "e2e" / "results.sqlite"
    rows = rows_of(db)
    assert len(rows) == 90

    # the runner's numbers equal a direct computation on the same images, targets and float16 maps
    ds, keep, masks, cov = shared_pointing
    ids = keep[:10]
    x = real_model.preprocess([ds[i].path for i in ids])
    labels = [ds[i].label for i in ids]
    check = cheap[0] if cheap else "tis"  # the wiring check runs the cheapest method again
    exp = vitlens.explain(real_model, x, method=check, target=labels, progress=False, **methods[check])
    maps16 = exp.maps.half().float()
    con = sqlite3.connect(str(db))
    rk = con.execute("SELECT run_key FROM runs WHERE label=?", (check,)).fetchone()[0]
    image_ids = [ds[i].image_id for i in ids]

    def stored(metric):
        d = dict(con.execute("SELECT image_id, value FROM results WHERE run_key=? AND metric=?", (rk, metric)))
        return np.array([np.nan if d[i] is None else d[i] for i in image_ids])

    ins = get_metric("insertion").fn(real_model, x, maps16, labels, n_steps=4).values.numpy()
    pg = pointing_hits(maps16, masks[:10], coverage=cov[:10]).numpy()
    np.testing.assert_allclose(stored("insertion"), ins, atol=1e-5)
    np.testing.assert_array_equal(stored("pointing_game"), pg)

    # report: mean and Student-t 95 % CI (t_{0.975, 9} = 2.262157) of the stored insertion values (AUCs of
    # probabilities: clipped to [0, 1]); pointing-game hits: Wilson interval
    md = (tmp_path / "e2e" / "results.md").read_text()
    import csv

    with open(tmp_path / "e2e" / "results.csv", newline="") as f:
        csv_rows = list(csv.reader(f))
    row = next(r for r in csv_rows if r[:2] == [check, "insertion"])
    v = stored("insertion")
    h = 2.262157 * v.std(ddof=1) / math.sqrt(10)
    assert math.isclose(float(row[5]), v.mean(), rel_tol=1e-9)
    assert math.isclose(float(row[6]), max(0.0, v.mean() - h), rel_tol=1e-5, abs_tol=1e-12)
    assert math.isclose(float(row[7]), min(1.0, v.mean() + h), rel_tol=1e-5)
    assert row[11] == "Student t, clipped to [0, 1]"
    row = next(r for r in csv_rows if r[:2] == [check, "pointing_game"])
    assert row[11] == "Wilson score interval of a proportion" and 0 <= float(row[6]) <= float(row[7]) <= 1
    best = [r for r in csv_rows[1:] if r[10] == "1"]
    assert {b[1] for b in best} == {"insertion", "deletion", "pointing_game"}  # a best per column (ties: all)
    assert md.split("\n## ")[0].count("**") == 2 * len(best)
    html = (tmp_path / "e2e" / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 2 and "src='http" not in html

    # resuming computes nothing; another parameter setting adds rows without touching the old ones
    again = run_bench(cfg)
    assert again["maps"] == 0 and again["rows"] == 0
    cfg2 = BenchConfig(**{**cfg.__dict__, "methods": {"tis": {"n_masks": 4, "max_iter": 5}},
                          "metrics": ["pointing_game"], "report": False})
    assert run_bench(cfg2)["rows"] == 10
    rows2 = rows_of(db)
    assert len(rows2) == 100 and all(rows2[k] == rows[k] for k in rows)
    out = write_report(tmp_path / "e2e")  # `vitlens report DIR`: every run in the folder
    assert out["table"].count("tis [") == 2  # the two TIS settings are told apart, never mixed


# ------------------------------------------------------------------------------------------ unit tests
def test_merge_is_idempotent_and_keeps_committed_rows(tmp_path):
    from vitlens.bench.shards import merge_into
    from vitlens.bench.store import Store

    def row(i, v):
        return dict(run_key="r", image_id=f"im{i}", metric="m", protocol_key="p", model="M", method="x",
                    value=v, curve=np.arange(3.0), xs=None, target=1, method_params={}, protocol={},
                    version="v", seconds=0.1)

    for s in range(2):
        st = Store(tmp_path / "shards" / f"results.shard-{s}-of-2.sqlite")
        st.put_results([row(s * 2 + j, float(s * 2 + j)) for j in range(2)])
        st.close()
    main = tmp_path / "results.sqlite"
    shards = sorted((tmp_path / "shards").glob("*.sqlite"))
    assert merge_into(main, shards, remove=False) == 2
    assert merge_into(main, shards, remove=True) == 2  # a second merge adds nothing
    rows = rows_of(main)
    assert {k[1]: v[0] for k, v in rows.items()} == {"im0": 0.0, "im1": 1.0, "im2": 2.0, "im3": 3.0}
    assert not list((tmp_path / "shards").glob("*.sqlite"))


def test_mean_ci_matches_student_t_by_hand():
    from vitlens.bench.stats import mean_ci

    v = [0.1, 0.4, 0.35, float("nan"), 0.8]
    c = mean_ci(v)
    finite = np.array([0.1, 0.4, 0.35, 0.8])
    half = 3.182446 * finite.std(ddof=1) / 2.0  # t_{0.975, 3}
    assert c.n == 4 and math.isclose(c.mean, finite.mean()) and math.isclose(c.half, half, rel_tol=1e-6)
    assert mean_ci([0.5]).n == 1 and math.isnan(mean_ci([0.5]).half)


def test_config_file_cli_precedence_and_errors(tmp_path):
    from vitlens.bench.cli import add_bench_arguments
    from vitlens.bench.config import build_config
    from vitlens.errors import InputError

    f = tmp_path / "c.toml"
    f.write_text('methods = "tis"\nmetrics = ["deletion"]\nlimit = 5\n[metric_params.deletion]\nn_steps = 8\n')
    cfg = build_config(dict(limit=3, method_params={"tis": {"n_masks": 4}}), file=str(f))
    assert cfg.limit == 3 and cfg.metrics == ["deletion"] and cfg.metric_params == {"deletion": {"n_steps": 8}}
    assert cfg.methods[0].params == {"n_masks": 4}
    j = tmp_path / "c.json"
    j.write_text(json.dumps({"methods": {"a": {"method": "tis", "n_masks": 2}}, "metrics": "insertion"}))
    cfg = build_config({}, file=str(j))
    assert (cfg.methods[0].label, cfg.methods[0].method, cfg.methods[0].params) == ("a", "tis", {"n_masks": 2})
    (tmp_path / "bad.toml").write_text("metrix = 1\n")
    with pytest.raises(InputError, match="unknown key.*metrix"):
        build_config({}, file=str(tmp_path / "bad.toml"))
    with pytest.raises(InputError, match="unknown preset"):
        build_config({"preset": "nope"})
    cfg = build_config({"preset": "tis-vit"})
    assert cfg.methods[0].params["n_masks"] == 1024 and "insertion_blur" in cfg.metrics
    import argparse
    ns = add_bench_arguments(argparse.ArgumentParser()).parse_args(["--shard", "1/3", "--no-resume"])
    assert ns.shard == "1/3" and ns.resume is False


def test_shards_split_batches_and_reject_bad_specs(monkeypatch):
    from vitlens.bench.distributed import shard_info
    from vitlens.errors import InputError

    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    info = shard_info("1/3")  # machine 1 of 3, rank 1 of 2 -> shard 3 of 6
    assert (info.index, info.count) == (3, 6)
    assert [k for k in range(13) if info.owns(k)] == [3, 9]
    with pytest.raises(InputError, match="0 <= i < n"):
        shard_info("3/3")
