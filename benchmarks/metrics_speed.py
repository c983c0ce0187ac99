"""Insertion + deletion on the real ViT-Ti against the bare cost of the same number of forward passes.

    python benchmarks/metrics_speed.py --images 2 --threads 1 [--device cuda] [--batch-size 64]
        [--precision bf16] [--compile]

Both are timed in the same run on the same images and batch size: the metric (building every step's
images, forward passes, scoring) and plain ``adapter.forward`` on the same count of pre-built images.
Prints one JSON line with the ratio (target <= 1.2).

    python benchmarks/metrics_speed.py --figures --methods tis,rollout --images 4 --threads 1

instead explains the first ``--images`` of the 200 shared pointing-game images (ground-truth class as
target) with each method and prints insertion, deletion (blur substrate, 224 steps, paper protocol) and
pointing-game hits for them, one JSON line per method (appended to benchmarks/results/metrics_shared.jsonl).
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from _shared import pointing_subset, shared_model


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def figures(args) -> None:
    import vitlens
    from vitlens.metrics import deletion, insertion, pointing_game

    from _shared import REPO

    model = shared_model()
    ds, keep, masks, cov = pointing_subset(model)
    ids = keep[: args.images]
    out = REPO / "benchmarks" / "results" / "metrics_shared.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    for method in args.methods.split(","):
        ins, dele, pg, t_exp, t_met = [], [], [], 0.0, 0.0
        for s in range(0, len(ids), 4):
            chunk = ids[s:s + 4]
            x = model.preprocess([ds[i].path for i in chunk])
            labels = [ds[i].label for i in chunk]
            t0 = time.perf_counter()
            try:
                exp = vitlens.explain(model, x, method=method, target=labels, progress=False)
            except Exception as e:  # a method under development must not stop the others
                print(json.dumps(dict(method=method, error=f"{type(e).__name__}: {e}")), flush=True)
                break
            t1 = time.perf_counter()
            ins.append(insertion(model, x, exp.maps, labels, batch_size=args.batch_size).values)
            dele.append(deletion(model, x, exp.maps, labels, batch_size=args.batch_size).values)
            t_met += time.perf_counter() - t1
            t_exp += t1 - t0
            pg.append(pointing_game(model, x, exp.maps, labels, boxes=masks[s:s + len(chunk)],
                                    coverage=cov[s:s + len(chunk)]).values)
        if not ins:
            continue
        res = dict(method=method, images=len(ids), insertion_blur=round(float(torch.cat(ins).mean()), 4),
                   deletion_blur=round(float(torch.cat(dele).mean()), 4),
                   pointing_game=round(float(torch.cat(pg).nanmean()), 4),
                   explain_s_per_image=round(t_exp / len(ids), 2), metrics_s_per_image=round(t_met / len(ids), 2),
                   threads=torch.get_num_threads())
        print(json.dumps(res), flush=True)
        with open(out, "a") as f:
            f.write(json.dumps(res) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--images", type=int, default=2)
    ap.add_argument("--n-steps", type=int, default=224)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--figures", action="store_true")
    ap.add_argument("--methods", default="tis")
    ap.add_argument("--precision", default="fp32", help="of the metric's and the bare forward passes")
    ap.add_argument("--compile", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.figures:
        return figures(args)
    from vitlens.batching import batch_slices, resolve_batch_size
    from vitlens.metrics import deletion, insertion
    from vitlens.precision import perturbed_forward, runtime

    model = shared_model()
    model.module.to(args.device)
    dev = model.device
    ds, keep, _, _ = pointing_subset(model)
    ids = keep[: args.images]
    x = model.preprocess([ds[i].path for i in ids]).to(dev)
    labels = [ds[i].label for i in ids]
    maps = torch.rand(len(ids), *x.shape[-2:], generator=torch.Generator().manual_seed(0)).to(dev)
    n_imgs = 2 * len(ids) * (args.n_steps + 1)
    gh, gw = model.grid_size(x)
    bs = resolve_batch_size(args.batch_size, model, gh * gw + model.num_prefix_tokens, n_imgs // 2)
    with torch.no_grad():  # warm-up
        model.forward(x[:1].expand(bs, -1, -1, -1).contiguous())
    best_metric, best_bare = float("inf"), float("inf")
    for _ in range(args.repeats):
        _sync(dev)
        t0 = time.perf_counter()
        run = dict(n_steps=args.n_steps, batch_size=bs, progress=False, precision=args.precision, compile=args.compile)
        ins = insertion(model, x, maps, labels, **run)
        dele = deletion(model, x, maps, labels, **run)
        _sync(dev)
        best_metric = min(best_metric, time.perf_counter() - t0)
        batch = x[:1].expand(bs, -1, -1, -1).contiguous()
        _sync(dev)
        t0 = time.perf_counter()
        with torch.no_grad(), runtime(args.precision, args.compile):
            for _ in range(2):
                for sl in batch_slices(n_imgs // 2, bs):
                    perturbed_forward(model, batch[: sl.stop - sl.start])
        _sync(dev)
        best_bare = min(best_bare, time.perf_counter() - t0)
    res = dict(images=len(ids), n_steps=args.n_steps, forward_passes=n_imgs, batch_size=bs,
               device=str(dev), threads=torch.get_num_threads(), precision=args.precision, compile=args.compile,
               metric_s=round(best_metric, 3),
               bare_forward_s=round(best_bare, 3), ratio=round(best_metric / best_bare, 3),
               insertion=[round(float(v), 4) for v in ins.values], deletion=[round(float(v), 4) for v in dele.values])
    print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
