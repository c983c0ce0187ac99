"""Fidelity of reduced precision: bf16 (or fp16) against fp32 on the real ViT-Ti and the shared
pointing-game images (boxes covering at most half of the crop; ground-truth class explained).

    python benchmarks/precision_fidelity.py --images 200 [--precision bf16] [--tis-masks 1024]
        [--rise-masks 4000] [--steps 224] [--out benchmarks/results/precision_fidelity.jsonl]
    python benchmarks/precision_fidelity.py --summary [--out ...]     # the markdown table

Per image and method (TIS, RISE, ViT-CX) it computes the map at fp32 and with the method's perturbed
forward passes at ``--precision`` (``vitlens.explain(..., precision=...)``), and records

* the Pearson correlation of the two maps (224 x 224 pixels, after explain's min-max normalisation),
* the pointing-game hit of each map (``vitlens.metrics.pointing_hits``),
* insertion and deletion AUC (paper protocol, blur substrate, ``--steps`` steps) of the *fp32* map
  with the metric's forward passes at fp32 and at ``--precision``: the change the metric's own
  precision makes.

One JSON line per image is appended to ``--out`` as soon as it is done, so the run can be stopped at
any time and resumed (images already in the file are skipped); ``--summary`` prints the table.
The masks are the same at both precisions by construction (TIS's K-Means runs on the fp32 clean
pass; RISE's masks and ViT-CX's noise are seeded; ViT-CX's clustering uses the fp32 clean features),
so every difference comes from the reduced-precision forward passes.
"""
from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import torch

from _shared import REPO, pointing_subset, shared_model

METHODS = ("tis", "rise", "vitcx")


def corr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    a, b = a - a.mean(), b - b.mean()
    den = (a.norm() * b.norm()).item()
    return float((a @ b).item() / den) if den > 0 else float("nan")


def run(args) -> None:
    import vitlens
    from vitlens.metrics import deletion, insertion, pointing_hits

    warnings.simplefilter("ignore", RuntimeWarning)  # the "no native bf16 on this CPU" notice
    model = shared_model(args.device)
    ds, keep, masks, cov = pointing_subset(model)
    masks, cov = masks.to(model.device), cov.to(model.device)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = set()
    if out.exists():
        done = {json.loads(line)["image"] for line in out.read_text().splitlines() if line.strip()}
    params = {"tis": dict(n_masks=args.tis_masks), "rise": dict(n_masks=args.rise_masks), "vitcx": {}}
    methods = args.methods.split(",")
    for j, i in enumerate(keep[: args.images]):
        item = ds[i]
        if item.path.name in done:
            continue
        x = model.preprocess([item.path]).to(model.device)
        tg = [item.label]
        row = dict(image=item.path.name, label=item.label, precision=args.precision, steps=args.steps,
                   params={m: params[m] for m in methods}, methods={})
        for m in methods:
            rec = {}
            t0 = time.perf_counter()
            a = vitlens.explain(model, x, m, target=tg, precision="fp32", progress=False, **params[m]).maps
            t1 = time.perf_counter()
            b = vitlens.explain(model, x, m, target=tg, precision=args.precision, progress=False, **params[m]).maps
            t2 = time.perf_counter()
            rec.update(corr=corr(a.cpu(), b.cpu()),
                       hit_fp32=float(pointing_hits(a, masks[j:j + 1], coverage=cov[j:j + 1])[0]),
                       hit_low=float(pointing_hits(b, masks[j:j + 1], coverage=cov[j:j + 1])[0]),
                       s_fp32=round(t1 - t0, 2), s_low=round(t2 - t1, 2))
            if args.steps:
                for name, fn in (("ins", insertion), ("del", deletion)):
                    t0 = time.perf_counter()
                    v32 = fn(model, x, a, tg, n_steps=args.steps, precision="fp32").values[0].item()
                    t1 = time.perf_counter()
                    vlo = fn(model, x, a, tg, n_steps=args.steps, precision=args.precision).values[0].item()
                    t2 = time.perf_counter()
                    rec.update({f"{name}_fp32": v32, f"{name}_low": vlo,
                                f"{name}_s_fp32": round(t1 - t0, 2), f"{name}_s_low": round(t2 - t1, 2)})
            row["methods"][m] = rec
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)


def summary(args) -> None:
    rows = [json.loads(line) for line in Path(args.out).read_text().splitlines() if line.strip()]
    if not rows:
        print("no results yet")
        return
    prec = rows[0]["precision"]
    print(f"{len(rows)} images; settings: {json.dumps(rows[0]['params'])}, insertion/deletion n_steps="
          f"{rows[0]['steps']}; {prec} vs fp32\n")
    print(f"| method | images | map correlation: mean (min) | pointing hit fp32 | pointing hit {prec} | "
          f"mean abs change insertion AUC ({prec} metric) | mean abs change deletion AUC ({prec} metric) |")
    print("|---|---|---|---|---|---|---|")
    for m in rows[0]["methods"]:
        rs = [r["methods"][m] for r in rows if m in r["methods"]]
        c = torch.tensor([r["corr"] for r in rs])
        h32 = sum(r["hit_fp32"] for r in rs) / len(rs)
        hlo = sum(r["hit_low"] for r in rs) / len(rs)
        cells = [m, str(len(rs)), f"{c.nanmean():.5f} ({c.min():.5f})", f"{h32:.3f}", f"{hlo:.3f}"]
        for name in ("ins", "del"):
            if f"{name}_fp32" in rs[0]:
                d = torch.tensor([abs(r[f"{name}_low"] - r[f"{name}_fp32"]) for r in rs])
                cells.append(f"{d.mean():.5f} (max {d.max():.5f})")
            else:
                cells.append("-")
        print("| " + " | ".join(cells) + " |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--precision", default="bf16", choices=["bf16", "fp16"])
    ap.add_argument("--tis-masks", type=int, default=1024)
    ap.add_argument("--rise-masks", type=int, default=4000)
    ap.add_argument("--steps", type=int, default=224, help="insertion/deletion steps (0: skip the metrics)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "precision_fidelity.jsonl"))
    ap.add_argument("--summary", action="store_true")
    ap.add_argument("--device", default=None, help="cpu | cuda (default: the library's default device)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.summary:
        summary(args)
    else:
        run(args)


if __name__ == "__main__":
    main()
