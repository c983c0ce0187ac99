"""Throughput of RISE and Score-CAM against the bare forward pass of the same number of images.

    python benchmarks/perturbation_throughput.py --images 2 --n-masks 4000 [--threads 1] [--device cuda]

For each method the script counts the model inputs the method evaluates (RISE: images x N masked
images; Score-CAM: images x D channel-masked images), then times, in the same run and with the same
batch size, ``adapter.forward`` on that many images (prebuilt batches, no masking, no scoring), before
and after the method. The ratio method time / bare time is the overhead of mask generation, masking,
scoring and accumulation (target: <= 1.2). Prints one JSON line per method and writes
``benchmarks/results/throughput_<method>.json``.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from _shared import REPO, pointing_subset, shared_model


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare_forward_seconds(adapter, x: torch.Tensor, total: int, batch: int) -> float:
    """Seconds to forward ``total`` images in batches of ``batch`` (copies of the given images)."""
    reps = -(-batch // x.shape[0])
    xb = x.repeat(reps, 1, 1, 1)[:batch].contiguous()
    dev = x.device
    with torch.no_grad():
        _sync(dev)
        t0 = time.perf_counter()
        done = 0
        while done < total:
            n = min(batch, total - done)
            adapter.forward(xb[:n])
            done += n
        _sync(dev)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--images", type=int, default=2)
    ap.add_argument("--n-masks", type=int, default=4000, help="RISE N")
    ap.add_argument("--methods", default="rise,scorecam")
    ap.add_argument("--batch", type=int, default=None, help="batch size (default: vitlens' automatic size)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import vitlens
    from vitlens.batching import resolve_batch_size

    model = shared_model()
    model.module.to(args.device)
    ds, keep, _, _ = pointing_subset(model)
    ids = keep[: args.images]
    x = model.preprocess([ds[i].path for i in ids]).to(args.device)
    target = [ds[i].label for i in ids]
    D = model.blocks[0].norm1.normalized_shape[-1]
    with torch.no_grad():
        model.forward(x)  # warm-up
    out_dir = REPO / "benchmarks" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    for method in args.methods.split(","):
        params = {"n_masks": args.n_masks} if method == "rise" else {}
        n_inputs = len(ids) * (args.n_masks if method == "rise" else D)
        batch = resolve_batch_size(args.batch, model, model.num_tokens(x), n_inputs)
        bare1 = bare_forward_seconds(model, x, n_inputs, batch)
        _sync(x.device)
        t0 = time.perf_counter()
        vitlens.explain(model, x, method=method, target=target, batch_size=batch, progress=False, **params)
        _sync(x.device)
        secs = time.perf_counter() - t0
        bare2 = bare_forward_seconds(model, x, n_inputs, batch)
        bare = (bare1 + bare2) / 2
        res = dict(method=method, images=len(ids), model_inputs=n_inputs, batch=batch, device=str(x.device),
                   threads=torch.get_num_threads(), method_inputs_per_s=n_inputs / secs,
                   bare_inputs_per_s=n_inputs / bare, method_s=secs, bare_s=[bare1, bare2],
                   ratio=secs / bare, within_1_2x=secs / bare <= 1.2, params=params)
        print(json.dumps(res), flush=True)
        (out_dir / f"throughput_{method}.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
