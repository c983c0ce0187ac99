"""Pointing-game hit rate and time per image of methods on the real ViT-Ti and the shared images
whose boxes cover at most half of the 224x224 crop (200 images; the centre pixel scores 0.60).

    python benchmarks/pointing_game_shared.py --methods tis,rollout --limit 200 [--threads 2]

The explained class is the ground-truth class. Prints one line per method and writes
``benchmarks/results/pointing_<method>.json``.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from _shared import REPO, pointing_subset, shared_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--methods", default="tis")
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--batch", type=int, default=4, help="images per explain() call")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--param", action="append", default=[], help="method parameter k=v (applies to all methods)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import vitlens
    from vitlens.metrics import pointing_hits

    model = shared_model()
    ds, keep, masks, cov = pointing_subset(model)
    keep, masks, cov = keep[: args.limit], masks[: args.limit], cov[: args.limit]
    params = {}
    for kv in args.param:
        k, v = kv.split("=", 1)
        params[k] = json.loads(v) if v[:1].isdigit() or v in ("true", "false") else v
    out_dir = REPO / "benchmarks" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    for method in args.methods.split(","):
        hits, secs = [], 0.0
        for s in range(0, len(keep), args.batch):
            ids = keep[s:s + args.batch]
            x = model.preprocess([ds[i].path for i in ids])
            t0 = time.perf_counter()
            exp = vitlens.explain(model, x, method=method, target=[ds[i].label for i in ids], progress=False, **params)
            secs += time.perf_counter() - t0
            hits.append(pointing_hits(exp.maps, masks[s:s + len(ids)], coverage=cov[s:s + len(ids)]))
        h = torch.cat(hits)
        res = dict(method=method, images=len(keep), hit_rate=float(h.nanmean()), seconds_per_image=secs / len(keep),
                   threads=torch.get_num_threads(), params=params)
        print(json.dumps(res), flush=True)
        (out_dir / f"pointing_{method}.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
