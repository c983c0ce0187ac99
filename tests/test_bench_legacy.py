"""Benchmark folders written by vitlens 0.1 keep working (issue 19): a database of the old layout (pooled
metrics' counts in the ``curve`` column) is migrated when opened and reports the same pooled numbers, old
shard files merge, and a folder whose run keys hash the old parameter names resumes without recomputing."""
from __future__ import annotations

import json
import shutil
import sqlite3
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

# the results table of vitlens 0.1 (schema version 1: no counts column)
V01_RESULTS = """CREATE TABLE results (
  run_key TEXT, image_id TEXT, metric TEXT, protocol_key TEXT, model TEXT, method TEXT, value REAL,
  curve BLOB, xs BLOB, target INTEGER, method_params TEXT, protocol TEXT, version TEXT, seconds REAL,
  created REAL, PRIMARY KEY (run_key, image_id, metric, protocol_key));"""


def _f32(a) -> bytes:
    return zlib.compress(np.asarray(a, dtype=np.float32).tobytes(), 6)


def _old_db(path: Path, run_key: str, counts: np.ndarray, ap: list, first: int = 0) -> None:
    """A vitlens 0.1 database: one segmentation run whose per-image counts sit in ``curve`` (xs NULL)."""
    from vitlens.bench.schema import SCHEMA

    path.parent.mkdir(parents=True, exist_ok=True)
    con = sqlite3.connect(str(path))
    con.executescript(V01_RESULTS + SCHEMA.split("CREATE TABLE IF NOT EXISTS results")[0]
                      + "CREATE TABLE IF NOT EXISTS errors" + SCHEMA.split("CREATE TABLE IF NOT EXISTS errors")[1])
    info = json.dumps(dict(input_size=[64, 64], crop_pct=1.0, interpolation="bilinear", mean=[0.5] * 3,
                           std=[0.5] * 3, transform="model"))
    con.execute("INSERT INTO runs VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (run_key, "rollout", "m", "random", "rollout", "{}", "predicted", 0, info, "0.1.0", 0.0))
    con.execute("INSERT INTO protocols VALUES ('pk', 'segmentation', '{\"threshold\":0.5}', 1)")
    for i, (c, v) in enumerate(zip(counts, ap)):
        con.execute("INSERT INTO results VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    (run_key, f"seg{first + i:05d}", "segmentation", "pk", "m", "rollout", v, _f32(c), None, 3,
                     "{}", "{}", "0.1.0", 0.0, 0.0))
    con.commit()
    con.close()


def _pooled_cells(md: str) -> list[str]:
    lines = md[md.index("Dataset-level scores"):].splitlines()
    return [ln for ln in lines if ln.startswith("| rollout")]


def test_an_old_layout_database_migrates_and_reports_the_same_pooled_numbers(tmp_path):
    from vitlens.bench import write_report
    from vitlens.bench.schema import SCHEMA_VERSION, connect
    from vitlens.metrics.segmentation import segmentation_scores_from_counts

    rng = np.random.default_rng(0)
    counts = rng.integers(0, 500, (6, 6)).astype(np.float32)
    ap = rng.random(6).tolist()
    out = tmp_path / "old"
    _old_db(out / "results.sqlite", "rk", counts[:4], ap[:4])
    # an old shard file holding the other two images (a manual --shard run of 0.1, not merged yet)
    _old_db(out / "shards" / "results.shard-1-of-2.sqlite", "rk", counts[4:], ap[4:], first=4)

    res = write_report(out, examples=0)  # merges the shard file, migrates both files
    want = segmentation_scores_from_counts(counts, ap)
    row = _pooled_cells(res["table"])
    assert row == [f"| rollout | {want['pixel_accuracy']:.4f} | {want['miou']:.4f} | {want['map']:.4f} |"]

    con = sqlite3.connect(str(out / "results.sqlite"))
    cols = [r[1] for r in con.execute("PRAGMA table_info(results)")]
    assert cols[-1] == "counts"
    got = con.execute("SELECT COUNT(*), SUM(curve IS NULL), SUM(counts IS NOT NULL) FROM results").fetchone()
    assert got == (6, 6, 6)
    assert con.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0] == str(SCHEMA_VERSION)
    blob = con.execute("SELECT counts FROM results WHERE image_id='seg00005'").fetchone()[0]
    np.testing.assert_array_equal(np.frombuffer(zlib.decompress(blob), np.float32), counts[5])
    con.close()
    connect(out / "results.sqlite").close()  # opening again changes nothing (idempotent)
    assert _pooled_cells(write_report(out, examples=0)["table"]) == row


# ------------------------------------------------------------------------------------------ run keys
def test_legacy_param_candidates_give_the_old_names_and_values():
    from vitlens.bench.legacy_keys import legacy_param_candidates as cands

    ro = dict(head_fusion="mean", discard_ratio=0.9, layers=None, variant="paper")
    assert cands("rollout", ro, 12) == [dict(head_fusion="mean", discard_ratio=0.9, start_layer=0, variant="paper")]
    assert [c["start_layer"] for c in cands("rollout", dict(ro, layers=[3, 4, 5, 6, 7, 8, 9, 10, 11]), 12)] == [3]
    assert [c["start_layer"] for c in cands("bt_head", dict(steps=20, layers=0.75, score="auto"), 12)] == [3]
    assert cands("rollout", dict(ro, layers=[0, 2]), 12) == []  # not a suffix: 0.1 had no such setting
    assert [c["n_layers"] for c in cands("textspan", dict(layers=4, contrast="none"), 4)] == [4, None]
    leg = dict(layers=0.4, score="auto", pooling="auto", correction=None, correction_prompt="a photo of a",
               correction_threshold=0.8)
    assert [c["layers"] for c in cands("legrad", leg, 12)] == ["paper", None, 0.4]
    assert [c["layers"] for c in cands("legrad", dict(leg, layers=None), 12)] == ["all"]
    assert [c["layers"] for c in cands("legrad", dict(leg, layers=2), 12)] == ["released", 2]
    gc = dict(score="auto", layers=None, site="input", weight_tokens=None, variant="default")
    assert {(c["layer"], c["site"]) for c in cands("gradcam", gc, 12)} == {
        (v, s) for v in (None, -1, 11) for s in (None, "input")}
    assert {c["layer"] for c in cands("gradcam", dict(gc, layers=[8]), 12)} == {8, -4}
    assert {c["layer"] for c in cands("raw_attention", dict(layers=None, head_fusion="mean"), 12)} == {-1, 11}
    vc = cands("vitcx", dict(layers=[-1], site="norm1", delta=None, masks="clustered", n_random_masks=None,
                             causal_score="debiased", pcb=True, sigma=0.1, score="auto", return_masks=False), 12)
    assert {(c["layer"], c["feature"]) for c in vc} == {(11, "norm1"), (-1, "norm1")} and "site" not in vc[0]
    assert cands("tis", dict(n_masks=8), 12) == []  # not renamed: its keys never changed


def _folder(root: Path) -> Path:
    rng = np.random.default_rng(3)
    root.mkdir(parents=True)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (70, 90, 3), dtype=np.uint8)).save(root / f"img{i}.png")
    return root


#: the full parameters vitlens 0.1 stored for these entries (its signatures, as the 0.1 runner filled them)
V01_FULL = {"rollout": dict(head_fusion="mean", discard_ratio=0.5, start_layer=0, variant="paper"),
            "legrad": dict(layers="paper", score="auto", pooling="auto", correction=None,
                           correction_prompt="a photo of a", correction_threshold=0.8)}


def _as_v01(db: Path, cfg) -> dict:
    """Rewrite the folder's runs to the keys and parameters vitlens 0.1 gave them; returns label -> old key."""
    from vitlens.bench.store import key_of

    con = sqlite3.connect(str(db))
    old = {}
    for label, params in V01_FULL.items():
        # the 0.1 runner's key: model, weights, model_args, method, full params, seed, target, input size
        old[label] = key_of(dict(model=cfg.model, weights="random", model_args=cfg.model_args, method=label,
                                 params=params, seed=cfg.seed, target=cfg.target, input_size=[64, 64]))
        new = con.execute("SELECT run_key FROM runs WHERE label=?", (label,)).fetchone()[0]
        assert new != old[label]  # the renamed parameters changed the key
        for table in ("runs", "maps", "results", "errors"):
            con.execute(f"UPDATE {table} SET run_key=? WHERE run_key=?", (old[label], new))
        con.execute("UPDATE maps SET run_key=? WHERE run_key=?", (old[label] + ":raw", new + ":raw"))
        con.execute("UPDATE runs SET method_params=? WHERE run_key=?", (json.dumps(params), old[label]))
    con.execute("DELETE FROM meta WHERE key='schema_version'")
    con.commit()
    con.close()
    return old


def test_a_v01_folder_resumes_under_the_new_keys_without_recomputing(tmp_path, capsys):
    from vitlens.bench import BenchConfig, run_bench, write_report

    def cfg(out: Path, **rollout) -> BenchConfig:
        return BenchConfig(out=str(out), model="vit_tiny_patch16_224", weights="random",
                           model_args=dict(img_size=64, depth=2), data=str(data),
                           methods={"rollout": dict(discard_ratio=0.5, **rollout), "legrad": {}},
                           metrics=["sparseness"], target="predicted", batch_size=2, threads=1, report=False,
                           progress=False)

    data = _folder(tmp_path / "images")
    out = tmp_path / "run"
    first = run_bench(cfg(out))
    assert (first["maps"], first["rows"]) == (4, 4)
    con = sqlite3.connect(str(out / "results.sqlite"))
    ref = dict(con.execute("SELECT method || image_id, value FROM results"))
    new_keys = dict(con.execute("SELECT label, run_key FROM runs"))
    con.close()
    old = _as_v01(out / "results.sqlite", cfg(out))

    # parameters 0.1 could not express: that run is computed anew, and the log says why in one line
    other = tmp_path / "other"
    shutil.copytree(out, other)
    assert run_bench(cfg(other, layers=[0]))["maps"] == 2  # rollout only; legrad resumes
    lines = [ln for ln in (other / "logs" / "bench.log").read_text().splitlines() if "0.1" in ln]
    assert any("'rollout'" in ln and "no vitlens 0.1 equivalent" in ln and "computing its maps anew" in ln
               for ln in lines), lines
    assert any("'legrad': resuming the vitlens 0.1 run" in ln for ln in lines), lines

    again = run_bench(cfg(out))
    assert (again["maps"], again["rows"]) == (0, 0)  # nothing recomputed
    con = sqlite3.connect(str(out / "results.sqlite"))
    assert dict(con.execute("SELECT label, run_key FROM runs")) == new_keys
    assert not con.execute("SELECT COUNT(*) FROM maps WHERE run_key IN (?, ?, ?, ?)",
                           (*old.values(), *(k + ":raw" for k in old.values()))).fetchone()[0]
    assert con.execute("SELECT COUNT(*) FROM maps").fetchone()[0] == 8  # 2 entries x 2 images, normalised + raw
    params = json.loads(con.execute("SELECT method_params FROM runs WHERE label='rollout'").fetchone()[0])
    assert "layers" in params and "start_layer" not in params  # the new vocabulary
    assert dict(con.execute("SELECT method || image_id, value FROM results")) == ref
    con.close()
    log = (out / "logs" / "bench.log").read_text()
    assert f"resuming the vitlens 0.1 run {old['rollout']} (discard_ratio" not in log  # only renamed ones named
    assert f"resuming the vitlens 0.1 run {old['rollout']} (start_layer=0)" in log
    res = write_report(out, examples=0)
    assert "rollout" in res["table"] and "legrad" in res["table"]
    capsys.readouterr()
