"""ViT-CX speed on the real ViT-Ti: full ViT-CX per image against the bare cost of its 2K forward
passes (K = the image's number of clustered masks), measured in the same run with the same batch size.

    python benchmarks/vitcx_speed.py [--images 5] [--threads N] [--device cuda] [--feature norm1]

The bare baseline runs the timm module itself on 2K ready-made 224x224 inputs (no feature pass, no
clustering, no mask/noise construction, no scoring): the floor any ViT-CX implementation pays.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from _shared import SHARED, shared_model


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default=None)
    ap.add_argument("--feature", default="attn_branch")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import vitlens
    from vitlens.batching import resolve_batch_size

    model = shared_model()
    if args.device:
        model.module.to(args.device)
    dev = model.device
    m = model.module
    paths = sorted((SHARED / "data" / "imagenet-val-sample" / "images").iterdir())[: args.images]
    x = model.preprocess(paths).to(dev)
    vitlens.explain(model, x[:1], "vitcx", progress=False, site=args.feature)  # warm-up
    cx_t, bare_t, ks = [], [], []
    for i in range(len(paths)):
        _sync(dev)
        t0 = time.perf_counter()
        exp = vitlens.explain(model, x[i:i + 1], "vitcx", progress=False, site=args.feature)
        _sync(dev)
        cx_t.append(time.perf_counter() - t0)
        k = exp.extras["n_masks"][0]
        ks.append(k)
        n = 2 * k
        bs = 2 * max(1, resolve_batch_size(None, model, 197, n) // 2)  # the batch ViT-CX used
        inputs = torch.randn(min(bs, n), 3, 224, 224, device=dev)
        _sync(dev)
        t0 = time.perf_counter()
        with torch.no_grad():
            for s in range(0, n, bs):
                m(inputs[: min(bs, n - s)])
        _sync(dev)
        bare_t.append(time.perf_counter() - t0)
    cx_s, bare_s = sum(cx_t) / len(cx_t), sum(bare_t) / len(bare_t)
    print(json.dumps(dict(images=len(paths), device=str(dev), feature=args.feature, threads=torch.get_num_threads(),
                          mean_masks=sum(ks) / len(ks), vitcx_s_per_image=round(cx_s, 3),
                          bare_2k_forward_s_per_image=round(bare_s, 3), ratio=round(cx_s / bare_s, 3))))


if __name__ == "__main__":
    main()
