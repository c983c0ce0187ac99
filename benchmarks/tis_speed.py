"""TIS speed on the real ViT-Ti: full TIS (N_m = 1024) against the bare cost of the same 1024
forward passes on half the tokens, measured in the same run with the same batch size.

    python benchmarks/tis_speed.py [--images 3] [--masks 1024] [--threads N] [--precision bf16] [--compile]

The bare baseline runs the model's own timm modules (blocks, norm, head) on random 99-token
sequences, with no K-Means, no gathers and no scoring: the floor any TIS implementation pays; both
run at ``--precision`` (autocast; default fp32). For the speed of bf16 / compile against fp32 eager in
one interleaved run, see ``precision_speed.py``.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from _shared import SHARED, shared_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=3)
    ap.add_argument("--masks", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--compile", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import vitlens
    from vitlens.batching import resolve_batch_size
    from vitlens.precision import autocast

    model = shared_model()
    m = model.module
    paths = sorted((SHARED / "data" / "imagenet-val-sample" / "images").iterdir())[: args.images]
    x = model.preprocess(paths)
    n_keep = 98
    bs = resolve_batch_size(None, model, 1 + n_keep, args.masks)
    run = dict(precision=args.precision, compile=args.compile, progress=False)
    vitlens.explain(model, x[:1], "tis", n_masks=32, **run)  # warm-up
    tis_t, bare_t = [], []
    for i in range(len(paths)):
        t0 = time.perf_counter()
        vitlens.explain(model, x[i:i + 1], "tis", n_masks=args.masks, **run)
        tis_t.append(time.perf_counter() - t0)
        seq = torch.randn(bs, 1 + n_keep, m.embed_dim)
        t0 = time.perf_counter()
        with torch.no_grad(), autocast("cpu", args.precision):
            for s in range(0, args.masks, bs):
                n = min(bs, args.masks - s)
                m.forward_head(m.norm(m.blocks(seq[:n])))
        bare_t.append(time.perf_counter() - t0)
    tis_s, bare_s = sum(tis_t) / len(tis_t), sum(bare_t) / len(bare_t)
    print(json.dumps(dict(images=len(paths), n_masks=args.masks, batch_size=bs, threads=torch.get_num_threads(),
                          precision=args.precision, compile=args.compile,
                          tis_s_per_image=round(tis_s, 3), bare_forward_s_per_image=round(bare_s, 3),
                          ratio=round(tis_s / bare_s, 3))))


if __name__ == "__main__":
    main()
