"""CPU (or GPU) speed of reduced precision and compiled forwards against fp32 eager, in one run.

    python benchmarks/precision_speed.py [--images 1] [--masks 1024] [--steps 224] [--repeats 2]
        [--configs fp32,bf16,fp32+compile,bf16+compile] [--threads 2] [--device cpu]

On the real ViT-Ti it times, for every configuration, TIS (``--masks`` masks) and insertion + deletion
(``--steps`` steps, blur substrate) on the same images, with the repeats interleaved across
configurations (so a machine shared with other jobs loads every configuration alike), keeps the best
repeat, and reports each configuration's speed-up over fp32 eager. Compilation time is the first
(untimed) call minus the best timed call, reported separately.

It also measures the machine's matrix-multiply peak (a 2048^3 GEMM at fp32 and bf16, same run) and the
fraction of it TIS reaches: TIS's useful work is its subset passes, 1024 x L x (24 T D^2 + 4 T^2 D)
FLOPs for T = 1 + N/2 tokens (plus the clean pass).
"""
from __future__ import annotations

import argparse
import json
import time
import warnings

import torch

from _shared import pointing_subset, shared_model


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def gemm_peak(dtype: torch.dtype, dev, n: int = 2048, reps: int = 3) -> float:
    """GFLOP/s of an n^3 matrix product at ``dtype`` (best of ``reps``)."""
    a = torch.randn(n, n, device=dev).to(dtype)
    b = torch.randn(n, n, device=dev).to(dtype)
    a @ b
    best = float("inf")
    for _ in range(reps):
        sync(dev)
        t0 = time.perf_counter()
        a @ b
        sync(dev)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e9


def encoder_flops(model, tokens: int) -> float:
    spec = model.blocks[0]
    D = int(spec.norm1.normalized_shape[-1])
    return model.num_blocks * (24 * tokens * D * D + 4 * tokens * tokens * D)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=1)
    ap.add_argument("--masks", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=224)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--configs", default="fp32,bf16,fp32+compile,bf16+compile")
    ap.add_argument("--work", default="tis,insdel", help="tis, insdel or both")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--gemm", type=int, default=2048, help="GEMM size for the peak (0: skip)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore", RuntimeWarning)
    import vitlens
    from vitlens.metrics import deletion, insertion
    from vitlens.precision import native_reduced_precision

    dev = torch.device(args.device)
    model = shared_model()
    model.module.to(dev)
    ds, keep, _, _ = pointing_subset(model)
    ids = keep[: args.images]
    x = model.preprocess([ds[i].path for i in ids]).to(dev)
    labels = [ds[i].label for i in ids]
    maps = torch.rand(len(ids), *x.shape[-2:], generator=torch.Generator().manual_seed(0)).to(dev)
    configs = [(c.split("+")[0], c.endswith("+compile")) for c in args.configs.split(",")]
    works = args.work.split(",")

    def job(work, prec, comp):
        if work == "tis":
            return lambda: vitlens.explain(model, x, "tis", target=labels, n_masks=args.masks, precision=prec,
                                           compile=comp, progress=False)
        return lambda: (insertion(model, x, maps, labels, n_steps=args.steps, precision=prec, compile=comp),
                        deletion(model, x, maps, labels, n_steps=args.steps, precision=prec, compile=comp))

    peak = {}
    if args.gemm:
        peak = {"fp32": gemm_peak(torch.float32, dev, args.gemm), "bf16": gemm_peak(torch.bfloat16, dev, args.gemm)}
    first, best = {}, {}
    for r in range(-1, args.repeats):  # r = -1: the untimed first call (warm-up / compilation), timed anyway
        for work in works:
            for prec, comp in configs:
                fn = job(work, prec, comp)
                sync(dev)
                t0 = time.perf_counter()
                fn()
                sync(dev)
                dt = time.perf_counter() - t0
                key = (work, prec, comp)
                if r < 0:
                    first[key] = dt
                else:
                    best[key] = min(best.get(key, float("inf")), dt)
                print(json.dumps(dict(repeat=r, work=work, precision=prec, compile=comp, s=round(dt, 2))), flush=True)
    n_keep = round(0.5 * model.grid_size(x)[0] * model.grid_size(x)[1])
    tis_flops = len(ids) * args.masks * encoder_flops(model, 1 + n_keep)
    out = dict(images=len(ids), masks=args.masks, steps=args.steps, threads=torch.get_num_threads(), device=str(dev),
               native_bf16=native_reduced_precision(dev, "bf16"),
               gemm_gflops={k: round(v, 1) for k, v in peak.items()}, results=[])
    for work in works:
        base = best[(work, "fp32", False)]
        for prec, comp in configs:
            t = best[(work, prec, comp)]
            row = dict(work=work, precision=prec, compile=comp, s_per_image=round(t / len(ids), 3),
                       speedup_vs_fp32_eager=round(base / t, 3),
                       compile_s=round(first[(work, prec, comp)] - t, 1) if comp else None)
            if work == "tis":
                row["gflops"] = round(tis_flops / t / 1e9, 1)
                if peak:
                    row["fraction_of_bf16_peak"] = round(tis_flops / t / 1e9 / peak["bf16"], 3)
                    row["fraction_of_fp32_peak"] = round(tis_flops / t / 1e9 / peak["fp32"], 3)
            out["results"].append(row)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
