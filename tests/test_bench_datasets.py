"""LeGrad's benchmarks in ``vitlens bench``: ImageNet-Segmentation and OpenImages V7 datasets (detection,
end to end on generated miniatures, kill -9 and resume), perturbation correctness against the label
(Chefer et al.'s ``pertubation_eval_from_hdf5.py``), the segmentation thresholds of LeGrad (0.5) and
Chefer (mean) against a reference written from ``imagenet_seg_eval.py``, and the LeGrad presets."""
from __future__ import annotations

import math
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vitlens
from vitlens.errors import InputError

from conftest import IMG, kill_when_rows_appear, tiny_timm, write_mat

PY = sys.executable
ENV = dict(os.environ, VITLENS_NO_PROGRESS="1", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
# a tiny randomly initialised open_clip CLIP (2 blocks, 64 px) built through the bench's own model loading
CLIP_NAME = "open_clip:ViT-B-16"
CLIP_ARGS = dict(embed_dim=16, vision_cfg=dict(image_size=IMG, patch_size=16, width=32, layers=2, head_width=16),
                 text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=1))
POINTS_HEADER = "ImageId,X,Y,Label,EstimatedYesNo,Source,YesVotes,NoVotes,UnsureVotes,TextLabel"


# ------------------------------------------------------------------------------------------- miniatures
def mini_seg(root: Path, n: int = 4) -> Path:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    images, masks = [], []
    for i in range(n):
        im = rng.integers(0, 255, (48 + 8 * i, 40 + 4 * i, 3), dtype=np.uint8)
        m = np.zeros(im.shape[:2], np.uint8)
        m[8 + i:30, 5:25 + i] = 1
        images.append(im)
        masks.append(m)
    write_mat(root / "gtsegs_ijcv.mat", images, masks)
    return root


def mini_openimages(root: Path) -> Path:
    rng = np.random.default_rng(1)
    (root / "images").mkdir(parents=True, exist_ok=True)
    for name, size in [("aaa", (90, 70)), ("bbb", (64, 80)), ("ccc", (70, 70))]:
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(root / "images" / f"{name}.jpg")
    rows = [POINTS_HEADER,
            "aaa,0.5,0.5,/m/01,yes,cs,3,0,0,", "aaa,0.45,0.2,/m/01,no,cs,0,3,0,", "aaa,0.6,0.6,/m/02,yes,cs,1,0,0,",
            "aaa,0.3,0.7,/m/02,no,cs,0,2,0,", "bbb,0.5,0.4,/m/02,yes,ih,2,0,0,", "bbb,0.5,0.9,/m/02,yes,ih,2,0,0,",
            "bbb,0.3,0.3,/m/03,no,ih,0,2,0,",  # /m/03 only 'no' in bbb: not present, not explained
            "ccc,0.5,0.5,/m/03,yes,cs,1,0,0,", "ccc,0.2,0.7,/m/03,no,cs,0,1,0,", "ccc,0.8,0.3,/m/01,unsure,cs,1,1,1,"]
    (root / "oidv7-val-annotations-point-labels.csv").write_text("\n".join(rows) + "\n")
    (root / "oidv7-class-descriptions.csv").write_text(
        "LabelName,DisplayName\n/m/00,Unused\n/m/01,Cat\n/m/02,Dog\n/m/03,Remote control\n")
    return root


def mini_imagenet(root: Path, n: int = 4) -> Path:
    rng = np.random.default_rng(2)
    (root / "images").mkdir(parents=True, exist_ok=True)
    syn = ["n01440764 tench, Tinca tinca", "n01443537 goldfish, Carassius auratus", "n01484850 great white shark"]
    (root / "LOC_synset_mapping.txt").write_text("\n".join(syn) + "\n")
    lines = ["ImageId,PredictionString"]
    for i in range(n):
        iid = f"ILSVRC2012_val_{i + 1:08d}"
        Image.fromarray(rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)).save(root / "images" / f"{iid}.JPEG")
        lines.append(f"{iid},{syn[i % 3].split()[0]} 10 10 50 40")
    (root / "LOC_val_solution.csv").write_text("\n".join(lines) + "\n")
    return root


def rows_of(db: Path, metric=None) -> dict:
    con = sqlite3.connect(str(db))
    try:
        q = "SELECT run_key, image_id, metric, protocol_key, value, curve FROM results"
        return {tuple(r[:4]): (r[4], r[5]) for r in con.execute(q) if metric is None or r[2] == metric}
    finally:
        con.close()


def run_key(db: Path, label: str) -> str:
    con = sqlite3.connect(str(db))
    try:
        return con.execute("SELECT run_key FROM runs WHERE label=?", (label,)).fetchone()[0]
    finally:
        con.close()


def stored_maps(db: Path, label: str) -> dict:
    from vitlens.bench.store import decode_map

    rk = run_key(db, label)
    con = sqlite3.connect(str(db))
    try:
        return {iid: (t, decode_map(b, s)) for iid, t, b, s in
                con.execute("SELECT image_id, target, map, shape FROM maps WHERE run_key=?", (rk,))}
    finally:
        con.close()


# ---------------------------------------------------------------------------- protocol: perturbation
def _chefer_perturbation(a, x, vis, label, negative, margins=None):
    """pertubation_eval_from_hdf5.py for one image: the clean image's top-1 == label, then for p = 0.1..0.9
    the topk(int(HW * p)) pixels of the (negated) map are set to 0 in [0, 1] space, the image is
    re-normalised and top-1 compared with the label (never with the explained class)."""
    mean = torch.tensor(a.mean).view(1, 3, 1, 1)
    std = torch.tensor(a.std).view(1, 3, 1, 1)
    data = x[None] * std + mean
    v = (-vis if negative else vis).reshape(1, -1)
    def top1(inp):
        out = a.forward(inp)
        if margins is not None:  # top-1 minus top-2 logit, relative to the logits' scale: near-ties can flip
            top = out.topk(2, dim=1).values[0]
            margins.append(float(top[0] - top[1]) / float(out.abs().max()))
        return out.argmax(1)[0]

    with torch.no_grad():
        hits = [float(top1(x[None]) == label)]
        for p in [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]:
            _, idx = torch.topk(v, int(v.shape[1] * p), dim=-1)
            d = data.clone().reshape(1, 3, -1)
            d = d.scatter(-1, idx[:, None, :].repeat(1, 3, 1), 0).reshape(data.shape)
            hits.append(float(top1((d - mean) / std) == label))
    return torch.tensor(hits)


@pytest.mark.parametrize("order", ["positive", "negative"])
def test_perturbation_correctness_is_against_the_label_not_the_explained_class(order):
    from vitlens.metrics import get_metric

    a = vitlens.wrap_model(tiny_timm())
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 3, IMG, IMG, generator=g)
    maps = torch.rand(3, IMG, IMG, generator=g)  # continuous: no ties, so topk and our stable sort agree
    with torch.no_grad():
        pred = a.forward(x).argmax(-1)
    labels = torch.stack([pred[0], (pred[1] + 1) % 10, pred[2]])  # image 1: the model is wrong
    explained = (pred + 3) % 10  # the class the maps explain: irrelevant to correctness
    res = get_metric(f"perturbation_{order}").fn(a, x, maps, explained, labels=labels)
    xs = np.arange(10) / 10
    for b in range(3):
        margins = []
        ref = _chefer_perturbation(a, x[b], maps[b], int(labels[b]), order == "negative", margins)
        # top-1 of batched vs single float32 forwards (rounding ~1e-6 of the logits' scale) agrees whenever
        # the top-2 margin is clear: check this data has one, then the 0/1 curves must be identical
        assert min(margins) > 1e-4
        torch.testing.assert_close(res.curves[b], ref, rtol=0, atol=0)
        auc = sum((ref[k] + ref[k + 1]) / 2 * (xs[k + 1] - xs[k]) for k in range(9))  # trapezoid, 0..0.9
        assert abs(float(res.values[b]) - float(auc)) < 1e-6
    assert res.curves[1][0] == 0  # the model is wrong on image 1's clean image: 0 from the start
    # explaining the predicted or the labelled class does not change what is correct
    again = get_metric(f"perturbation_{order}").fn(a, x, maps, pred, labels=labels)
    torch.testing.assert_close(again.curves, res.curves)


def test_perturbation_needs_labels_in_the_bench():
    from vitlens.bench.metrics_bridge import bind

    m = bind("perturbation_positive")
    assert "labels" in m.needs and "labels" not in m.protocol
    a = vitlens.wrap_model(tiny_timm())
    x = torch.zeros(1, 3, IMG, IMG)
    with pytest.raises(InputError, match="needs 'labels'"):
        m(a, x, torch.rand(1, IMG, IMG), [0], {}, None)


# ---------------------------------------------------------------------------- protocol: segmentation
def _chefer_segmentation(maps, masks, thr):
    """imagenet_seg_eval.py per image: Res min-max normalised, Res_1 = Res > t (t = Res.mean() or 0.5),
    Res_0 = Res <= t, prediction = argmax over (Res_0, Res_1); utils/metrices.py: batch_pix_accuracy and
    batch_intersection_union (labels + 1, histograms over classes 1..2, unlabelled pixels ignored);
    AP of cat(1 - Res, Res) against the one-hot labels (sklearn's average_precision_score)."""
    from sklearn.metrics import average_precision_score

    tot_c = tot_l = 0
    tot_i, tot_u, aps = np.zeros(2), np.zeros(2), []
    for m, g in zip(maps.numpy().astype(np.float64), masks.numpy()):
        res = (m - m.min()) / (m.max() - m.min())
        t = res.mean() if thr == "mean" else thr
        out = np.stack([(res <= t), (res > t)]).astype(np.float64)
        pred = out.argmax(0) + 1
        tgt = g + 1
        tot_l += int((tgt > 0).sum())
        tot_c += int(((pred == tgt) & (tgt > 0)).sum())
        pred = pred * (tgt > 0)
        inter = pred * (pred == tgt)
        ai = np.histogram(inter, bins=2, range=(1, 2))[0]
        ap_ = np.histogram(pred, bins=2, range=(1, 2))[0]
        al = np.histogram(tgt, bins=2, range=(1, 2))[0]
        tot_i += ai
        tot_u += ap_ + al - ai
        valid = (g >= 0).reshape(-1)
        onehot = np.stack([g == 0, g == 1]).reshape(2, -1)[:, valid].reshape(-1)
        scores = np.stack([1 - res, res]).reshape(2, -1)[:, valid].reshape(-1)
        aps.append(np.nan_to_num(average_precision_score(onehot, scores)))
    return tot_c / tot_l, float((tot_i / tot_u).mean()), float(np.mean(aps))


def test_segmentation_default_threshold_is_legrads_half_and_mean_is_chefers():
    pytest.importorskip("sklearn")
    from vitlens.metrics import get_metric, segmentation, segmentation_scores

    assert get_metric("segmentation").defaults["threshold"] == 0.5
    g = torch.Generator().manual_seed(4)
    # quantised maps: many pixels exactly at 0.5 after min-max (must be background: strict '>')
    maps = (torch.rand(3, 16, 16, generator=g) * 4).round() / 4
    maps[1] = maps[1] ** 3  # skewed: its mean is far from 0.5
    masks = (torch.rand(3, 16, 16, generator=g) > 0.5).long()
    masks[2, :2] = -1  # unlabelled pixels
    got = {}
    for thr in (None, 0.5, "mean"):
        kw = {} if thr is None else dict(threshold=thr)
        s = segmentation_scores(segmentation(None, None, maps, masks=masks, **kw))
        got[thr] = (s["pixel_accuracy"], s["miou"], s["map"])
    for thr in (0.5, "mean"):
        acc, miou, mAP = _chefer_segmentation(maps, masks, thr)
        assert abs(got[thr][0] - acc) < 1e-12 and abs(got[thr][1] - miou) < 1e-12  # integer counts: exact
        assert abs(got[thr][2] - mAP) < 1e-6  # float64 AP vs sklearn: same sums, different order
    assert got[None] == got[0.5] and got[0.5][:2] != got["mean"][:2]


# ------------------------------------------------------------------------------------------- detection
def test_dataset_detection_and_errors(tmp_path):
    from vitlens.bench.datasets import detect, metrics_for, open_dataset

    seg = mini_seg(tmp_path / "seg", 2)
    oi = mini_openimages(tmp_path / "oi")
    inet = mini_imagenet(tmp_path / "inet", 2)
    (tmp_path / "plain").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "plain" / "a.png")
    assert detect(str(seg)) == detect(str(seg / "gtsegs_ijcv.mat")) == "imagenet-seg"
    assert detect(str(oi)) == "openimages" and detect(str(inet)) == "imagenet" and detect(str(tmp_path / "plain")) == "folder"
    assert open_dataset(str(inet), "folder").kind == "folder"  # --dataset overrides detection
    d = open_dataset(str(oi))
    assert [it.image_id for it in d.items] == ["aaa:/m/01", "aaa:/m/02", "bbb:/m/02", "ccc:/m/03"]
    assert [it.label for it in d.items] == [1, 2, 2, 3]  # row of the class-description file
    assert metrics_for({"imagenet-seg": ["segmentation"]}, "imagenet-seg") == ["segmentation"]
    assert metrics_for("a,b", "folder") == ["a", "b"]
    with pytest.raises(InputError, match="lists metrics for the datasets imagenet-seg"):
        metrics_for({"imagenet-seg": ["segmentation"]}, "openimages")
    with pytest.raises(InputError, match="unknown dataset kind"):
        open_dataset(str(oi), "coco")
    from vitlens.bench import BenchConfig

    with pytest.raises(InputError, match="unknown dataset kind.*coco"):
        BenchConfig(methods="rollout", metrics={"coco": ["open_vocab"]}).normalise()
    (oi / "copy.csv").write_text((oi / "oidv7-val-annotations-point-labels.csv").read_text())
    with pytest.raises(InputError, match="exactly one OpenImages point-label CSV"):
        open_dataset(str(oi))
    with pytest.raises(InputError, match="not found"):
        open_dataset(str(tmp_path / "missing"))


# ------------------------------------------------------------------ ImageNet-Segmentation end to end
SEG_ARGS = ["--model", "vit_tiny_patch16_224", "--weights", "random", "--model-arg", "img_size=64",
            "--model-arg", "depth=2", "--methods", "tis,rollout", "--method-param", "tis.n_masks=64",
            "--metrics", "segmentation,sparseness", "--target", "predicted", "--batch-size", "1", "--threads", "1",
            "--no-progress", "--no-report"]


def test_segmentation_bench_kill9_resume_and_pooled_scores(tmp_path):
    pytest.importorskip("h5py")
    from vitlens.bench import BenchConfig, run_bench, write_report
    from vitlens.data import ImageNetSegmentation
    from vitlens.metrics import segmentation, segmentation_scores

    data = mini_seg(tmp_path / "seg", 4)
    cfg = dict(model="vit_tiny_patch16_224", weights="random", model_args=dict(img_size=IMG, depth=2),
               methods={"tis": {"n_masks": 64}, "rollout": {}}, metrics=["segmentation", "sparseness"],
               target="predicted", batch_size=1, threads=1, report=False, progress=False, data=str(data))
    ref_out = tmp_path / "ref"
    run_bench(BenchConfig(out=str(ref_out), **cfg))  # uninterrupted, in this process (1 thread, as the CLI run)
    ref = rows_of(ref_out / "results.sqlite")
    assert len(ref) == 4 * 2 * 2

    out = tmp_path / "crash"
    p = subprocess.Popen([PY, "-m", "vitlens.bench", *SEG_ARGS, "--data", str(data), "--out", str(out)],
                         env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    db = out / "results.sqlite"
    killed = kill_when_rows_appear(p, db, poll=0.01) is not None
    log, _ = p.communicate(timeout=60)
    assert killed and p.returncode == -signal.SIGKILL, f"the run finished before it could be killed: {log}"
    partial = rows_of(db)
    assert 0 < len(partial) < len(ref) and all(partial[k] == ref[k] for k in partial)
    con = sqlite3.connect(str(db))
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    con.close()
    t_resume = time.time()
    summary = run_bench(BenchConfig(out=str(out), **cfg))  # resume (the default): only the missing rows
    assert rows_of(db) == ref  # values and stored per-image counts, bit for bit
    # the killed run's rows (inserted before the resume) are all kept and none is computed again; they may
    # include one transaction committed at the instant of the kill that readers only see once SQLite has
    # recovered the WAL, so they are counted from the insertion times rather than from `partial`
    con = sqlite3.connect(str(db))
    old = {tuple(r) for r in con.execute("SELECT run_key, image_id, metric, protocol_key FROM results "
                                         "WHERE created < ?", (t_resume,))}
    con.close()
    assert set(partial) <= old and summary["rows"] == len(ref) - len(old)

    # the pooled scores in results.md equal the metric on the stored (float16) maps and the loader's masks
    write_report(out, examples=0)
    ds = ImageNetSegmentation(data / "gtsegs_ijcv.mat")
    masks = ds.masks(range(4), (IMG, IMG))
    md = (out / "results.md").read_text()
    for label in ("tis", "rollout"):
        maps = stored_maps(db, label)
        m = torch.from_numpy(np.stack([maps[f"seg{i:05d}"][1] for i in range(4)]))
        s = segmentation_scores(segmentation(None, None, m, masks=masks))  # threshold 0.5
        line = next(r for r in md.splitlines() if r.startswith(f"| {label} |") and r.count("|") == 5)
        nums = [float(v) for v in line.strip("| ").split("|")[1:]]
        np.testing.assert_allclose(nums, [s["pixel_accuracy"], s["miou"], s["map"]], atol=5e-5)  # 4 decimals
    ds.close()


def test_segmentation_refuses_label_targets_and_metrics_without_ground_truth(tmp_path):
    from vitlens.bench import BenchConfig, run_bench

    data = mini_seg(tmp_path / "seg", 2)
    cfg = dict(out=str(tmp_path / "o"), model="vit_tiny_patch16_224", weights="random",
               model_args=dict(img_size=IMG, depth=2), data=str(data), methods="rollout", report=False,
               progress=False)
    with pytest.raises(InputError, match="no class labels.*--target predicted"):
        run_bench(BenchConfig(metrics="segmentation", target="label", **cfg))
    with pytest.raises(InputError, match=r"'perturbation_positive' needs labels.*runs on: imagenet\.$"):
        run_bench(BenchConfig(metrics="perturbation_positive", target="predicted", **cfg))
    with pytest.raises(InputError, match="'segmentation' needs masks.*runs on: imagenet-seg"):
        run_bench(BenchConfig(**{**cfg, "data": str(mini_openimages(tmp_path / "oi"))}, metrics="segmentation"))


# ------------------------------------------------------------------------- OpenImages end to end
def test_openimages_one_map_per_image_class_stored_and_reused(tmp_path, monkeypatch):
    pytest.importorskip("open_clip")
    from vitlens.bench import BenchConfig, run_bench
    from vitlens.data import OpenImagesPoints
    from vitlens.metrics import open_vocab

    torch.set_num_threads(1)
    data = mini_openimages(tmp_path / "oi")
    cfg = dict(model=CLIP_NAME, weights="random", model_args=CLIP_ARGS, data=str(data),
               methods={"legrad": {}, "gradcam": {}}, metrics=["open_vocab", "sparseness"], batch_size=3,
               report=True, examples=0, progress=False, threads=1)
    ref = run_bench(BenchConfig(out=str(tmp_path / "ref"), **cfg))
    pairs = ["aaa:/m/01", "aaa:/m/02", "bbb:/m/02", "ccc:/m/03"]
    assert ref["maps"] == 4 * 2 and ref["rows"] == 4 * 2 * 2  # one map per (pair, method), reused by 2 metrics
    db = tmp_path / "ref" / "results.sqlite"

    # reference: each (image, class) explained alone with its prompt, metric from the loader's points
    torch.manual_seed(0)
    model = vitlens.load_model(CLIP_NAME, weights="random", **CLIP_ARGS)
    model.module.eval()
    ds = OpenImagesPoints(data / "oidv7-val-annotations-point-labels.csv", data / "images",
                          data / "oidv7-class-descriptions.csv")
    prompts = {"aaa:/m/01": "a photo of a cat", "aaa:/m/02": "a photo of a dog", "bbb:/m/02": "a photo of a dog",
               "ccc:/m/03": "a photo of a remote control"}
    inter: dict = {}
    union: dict = {}
    for method in ("legrad", "gradcam"):
        got = stored_maps(db, method)
        assert sorted(got) == pairs
        vals = {k[1]: v[0] for k, v in rows_of(db, "open_vocab").items() if k[0] == run_key(db, method)}
        for i, pid in enumerate(pairs):
            x = model.preprocess([ds.pairs[i].path])
            exp = vitlens.explain(model, x, method=method, target=prompts[pid], progress=False)
            m16 = exp.maps.half().float()
            # the stored map is the float16-rounded map; recomputed here alone (the bench batched 3 pairs),
            # float32 drift may round to the neighbouring float16: at most one float16 step (2^-11 below 1)
            # plus the drift itself
            np.testing.assert_allclose(got[pid][1], m16[0].numpy(), atol=1e-3)
            assert got[pid][0] == {"/m/01": 1, "/m/02": 2, "/m/03": 3}[pid.split(":")[1]]
            pts, labs = ds.points_for([i], model.input_size, model.crop_pct)
            r = open_vocab(None, None, torch.from_numpy(got[pid][1])[None], [got[pid][0]], points=pts,
                           point_labels=labs)
            v = float(r.values[0])
            assert (vals[pid] is None and math.isnan(v)) or abs(vals[pid] - v) < 1e-6
            if method == "legrad":
                c = got[pid][0]
                inter[c] = inter.get(c, 0) + int(r.extras["intersection"][0])
                union[c] = union.get(c, 0) + int(r.extras["union"][0])
    md = (tmp_path / "ref" / "results.md").read_text()
    line = next(r for r in md.splitlines() if r.startswith("| legrad |") and "–" not in r and r.count("|") == 3)
    p_miou = np.mean([inter[c] / union[c] for c in inter if union[c] > 0])
    assert abs(float(line.strip("| ").split("|")[1]) - p_miou) < 5e-5

    # interrupted after the first batch of maps, then resumed: only the missing work, same rows
    import vitlens as vl

    real = vl.explain
    calls = {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] > 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(vl, "explain", flaky)
    out = tmp_path / "resume"
    with pytest.raises(KeyboardInterrupt):
        run_bench(BenchConfig(out=str(out), **{**cfg, "report": False}))
    partial = rows_of(out / "results.sqlite")
    assert 0 < len(partial) < len(rows_of(db))
    monkeypatch.setattr(vl, "explain", real)
    again = run_bench(BenchConfig(out=str(out), **{**cfg, "report": False}))
    assert again["maps"] == 2 * 1 and again["rows"] == len(rows_of(db)) - len(partial)  # the 4th pair only
    assert rows_of(out / "results.sqlite") == rows_of(db)
    assert run_bench(BenchConfig(out=str(out), **{**cfg, "report": False}))["maps"] == 0  # stored, reused


# --------------------------------------------------------------- ImageNet perturbation with CLIP, both targets
def test_clip_perturbation_bench_both_targets_measure_against_the_label(tmp_path):
    pytest.importorskip("open_clip")
    from vitlens.bench import BenchConfig, run_bench
    from vitlens.bench.datasets import open_dataset
    from vitlens.metrics import perturbation

    torch.set_num_threads(1)
    data = mini_imagenet(tmp_path / "inet", 4)
    base = dict(model=CLIP_NAME, weights="random", model_args=CLIP_ARGS, data=str(data), methods="legrad",
                metrics=["perturbation_positive"], batch_size=4, report=False, progress=False, threads=1)
    torch.manual_seed(0)
    model = vitlens.load_model(CLIP_NAME, weights="random", **CLIP_ARGS)
    model.module.eval()
    ds = open_dataset(str(data))
    ds.prepare_model(model)  # the folder's 3 class names as zero-shot vocabulary
    assert model.class_names == ["tench", "goldfish", "great white shark"]
    x = ds.load(model, ds.items)
    labels = torch.tensor([it.label for it in ds.items])
    with torch.no_grad():
        pred = model.class_logits(model.forward(x)).argmax(-1).cpu()
    assert (pred != labels).any(), "test needs an image the random model gets wrong"
    for rule in ("predicted", "label"):
        out = tmp_path / rule
        run_bench(BenchConfig(out=str(out), target=rule, **base))
        maps = stored_maps(out / "results.sqlite", "legrad")
        ids = [it.image_id for it in ds.items]
        assert [maps[i][0] for i in ids] == (pred if rule == "predicted" else labels).tolist()  # explained class
        m = torch.from_numpy(np.stack([maps[i][1] for i in ids]))
        ref = perturbation(model, x, m, None, labels=labels)  # correctness against the ground truth
        rows = {k[1]: v[0] for k, v in rows_of(out / "results.sqlite").items()}
        np.testing.assert_allclose([rows[i] for i in ids], ref.values.numpy(), atol=1e-6)


# -------------------------------------------------------------------------------------------- presets
def test_legrad_presets_pin_models_tags_methods_and_metrics():
    import vitlens.bench.presets as P
    from vitlens.bench.config import build_config
    from vitlens.bench.datasets import KINDS, metrics_for

    clip = {"legrad-clip": ("open_clip:ViT-B-16", "laion2b_s34b_b88k"),
            "legrad-clip-l14": ("open_clip:ViT-L-14", "laion2b_s32b_b82k"),
            "legrad-clip-h14": ("open_clip:ViT-H-14", "laion2b_s32b_b79k"),
            "legrad-clip-bigg14": ("open_clip:ViT-bigG-14", "laion2b_s39b_b160k"),
            "legrad-siglip": ("open_clip:ViT-B-16-SigLIP", "webli")}
    table7 = ["legrad", "raw_attention", "rollout", "gradcam", "attention_cam", "chefer1", "chefer2", "lrp",
              "partial_lrp"]
    for name, (model, tag) in clip.items():
        p = P.get_preset(name)
        assert (p["model"], p["weights"], p["target"]) == (model, tag, "predicted")
        assert metrics_for(p["metrics"], "imagenet-seg") == ["segmentation"]
        assert metrics_for(p["metrics"], "openimages") == ["open_vocab"]
        assert metrics_for(p["metrics"], "imagenet") == ["perturbation_positive", "perturbation_negative"]
        assert p["metric_params"]["segmentation"] == {"threshold": 0.5}
        assert set(p["metrics"]) <= set(KINDS)
        cfg = build_config({"preset": name, "target": "label"})  # --target label: the other column
        assert cfg.target == "label" and cfg.model == model
    for name in [n for n in clip if n != "legrad-siglip"]:
        assert list(P.get_preset(name)["methods"]) == [*table7, "textspan"]
    assert list(P.get_preset("legrad-siglip")["methods"]) == ["legrad", "gradcam"]
    for name in [*clip, "legrad-vit"]:  # LeGrad supp. eqs. 9 and 10, not the methods' own defaults
        ms = P.get_preset(name)["methods"]
        assert ms["gradcam"] == {"variant": "legrad"} and ms["legrad"] == {}
        assert ms.get("attention_cam", {"variant": "legrad"}) == {"variant": "legrad"}
    vit = P.get_preset("legrad-vit")
    assert vit["model"] == "vit_base_patch16_224.orig_in21k_ft_in1k" and list(vit["methods"]) == table7
    assert vit["metrics"] == ["perturbation_positive", "perturbation_negative"] and vit["target"] == "predicted"
    import argparse

    from vitlens.bench.cli import add_bench_arguments

    assert add_bench_arguments(argparse.ArgumentParser()).parse_args(["--dataset", "openimages"]).dataset == "openimages"
    for key in ("legrad-clip", "legrad-siglip", "legrad-vit"):
        assert "Table" in P.LEGRAD_DOCS[key]
    registered = set(vitlens.methods())
    if "lrp" in registered:  # the LRP method lands with the models work; until then the dicts are checked
        for name in [*clip, "legrad-vit"]:
            assert set(P.get_preset(name)["methods"]) <= registered, name
