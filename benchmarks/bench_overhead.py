"""How much a bench run costs beyond its methods' and metrics' own work (issue 15 item 6: target <= 1.15).

    python benchmarks/bench_overhead.py --images 32 --batch-size 8 --threads 2 [--device cuda]
        [--methods rollout,gradcam] [--metrics insertion,deletion,pointing_game] [--steps 16]

In one run, on the shared ViT-Ti and the first ``--images`` shared pointing-game images:

1. **own cost**: every method and metric called directly on pre-decoded, pre-normalised tensors (the
   images and box masks are built before the clock starts), batch by batch as the bench batches them;
2. **bench**: ``vitlens bench`` on the same images, methods, metrics and batches into a fresh folder
   (its batch loop's wall time: image decoding, target selection, storing maps and rows, progress,
   everything but model loading and the report).

The bench runs once per variant (``--variants``): ``none`` (no background threads), ``loader`` (the
background image loader) and ``both`` (loader and the background store writer); the own cost is measured
before and after them and their mean is the baseline. Prints one JSON line: the times, images/s and
``ratio = bench loop / own cost`` per variant; also the bench's own accounting (``compute_seconds``: the
time inside method/metric calls as the runner measured them, and ``ratio_inside`` = loop / that).
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from _shared import MODEL, SHARED


def own_cost(model, ids_paths, labels, masks, coverage, methods, metrics, steps, batch_size, fbs) -> float:
    import vitlens
    from vitlens.bench.datasets import load_images
    from vitlens.metrics.base import get_metric

    xs = [load_images(model, ids_paths[k:k + batch_size]) for k in range(0, len(ids_paths), batch_size)]
    total = 0.0
    for b, x in enumerate(xs):
        sl = slice(b * batch_size, b * batch_size + x.shape[0])
        tg = labels[sl]
        for m in methods:
            t0 = time.perf_counter()
            exp = vitlens.explain(model, x, method=m, target=tg, seed=0, batch_size=fbs, progress=False)
            maps = torch.from_numpy(exp.numpy()).half().float().to(x.device)  # the bench's float16 round trip
            total += time.perf_counter() - t0
            for name in metrics:
                info = get_metric(name)
                kw = {}
                if name in ("insertion", "deletion"):
                    kw["n_steps"] = steps
                if "boxes" in info.needs:
                    kw.update(boxes=masks[sl], coverage=coverage[sl].float())
                t0 = time.perf_counter()
                info.fn(model, x, maps, tg, batch_size=fbs, progress=False, **kw)
                total += time.perf_counter() - t0
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--forward-batch-size", type=int, default=None)
    ap.add_argument("--methods", default="rollout,gradcam")
    ap.add_argument("--metrics", default="insertion,deletion,pointing_game")
    ap.add_argument("--steps", type=int, default=16, help="insertion/deletion steps")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--variants", default="none,loader,both",
                    help="bench runs to time: none (no background threads), loader (background image loader), "
                         "both (loader and background store writer)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from vitlens.bench import BenchConfig, run_bench
    from vitlens.data import ImageNetBoxes

    methods = [m for m in args.methods.split(",") if m]
    metrics = [m for m in args.metrics.split(",") if m]
    import os

    import vitlens

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model = vitlens.load_model(MODEL, weights=str(SHARED / "models"), device=args.device)
    data = SHARED / "data" / "imagenet-val-sample"
    ds = ImageNetBoxes(data)
    idx = list(range(args.images))
    paths = [ds[i].path for i in idx]
    labels = [ds[i].label for i in idx]
    masks = ds.box_masks(idx, model.input_size, model.crop_pct)
    coverage = ds.box_coverage(idx, model.input_size, model.crop_pct)
    # warm-up (allocations, lazy imports) on one image, outside both clocks
    own_cost(model, paths[:1], labels[:1], masks[:1], coverage[:1], methods, metrics, args.steps, 1,
             args.forward_batch_size)
    own = own_cost(model, paths, labels, masks, coverage, methods, metrics, args.steps, args.batch_size,
                   args.forward_batch_size)
    variants = {"none": ("0", "0"), "loader": ("1", "0"), "both": ("1", "1")}  # (background loader, writer)
    runs = {}
    for name in [v for v in args.variants.split(",") if v]:  # the same work, in the same run
        prefetch, writer = variants[name]
        os.environ["VITLENS_BENCH_PREFETCH"], os.environ["VITLENS_BENCH_WRITER"] = prefetch, writer
        with tempfile.TemporaryDirectory() as tmp:
            cfg = BenchConfig(out=str(Path(tmp) / "run"), model=MODEL, weights=str(SHARED / "models"),
                              data=str(data), methods=methods, metrics=metrics,
                              metric_params={m: {"n_steps": args.steps} for m in metrics
                                             if m in ("insertion", "deletion")},
                              limit=args.images, batch_size=args.batch_size,
                              forward_batch_size=args.forward_batch_size, device=args.device, report=False,
                              progress=False)
            runs[name] = run_bench(cfg)
    # own cost again after the bench runs: the mean of both brackets the runs against load drift
    own2 = own_cost(model, paths, labels, masks, coverage, methods, metrics, args.steps, args.batch_size,
                    args.forward_batch_size)
    own_mean = (own + own2) / 2
    n = args.images
    out = dict(images=n, batch_size=args.batch_size, methods=methods, metrics=metrics, steps=args.steps,
               threads=torch.get_num_threads(), device=args.device, own_seconds_before=round(own, 3),
               own_seconds_after=round(own2, 3), own_images_per_s=round(n / own_mean, 3))
    for name, s in runs.items():
        out[name] = dict(loop_seconds=round(s["loop_seconds"], 3), compute_seconds=round(s["compute_seconds"], 3),
                         images_per_s=round(n / s["loop_seconds"], 3), ratio=round(s["loop_seconds"] / own_mean, 3),
                         ratio_inside=round(s["loop_seconds"] / s["compute_seconds"], 3))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
