"""GPU throughput of the forward-heavy methods and metrics, against the bare forward passes they need,
at fp32 and bf16, measured in one run.

    python benchmarks/gpu_bench.py                       # CUDA: ViT-B/16 (random weights) + the real ViT-Ti
    python benchmarks/gpu_bench.py --quick --device cpu  # a smoke run of the same code on the CPU
    python benchmarks/gpu_bench.py --quick --device cpu --models tiny   # the same in seconds (2-block 64 px ViT)
    python benchmarks/gpu_bench.py --models vit_tiny --precisions bf16 --compile

For each model and precision it prints (and writes to ``benchmarks/results/gpu_bench.json``):

* **bare forward throughput**: ``adapter.forward`` on a full batch of images (images/s), and the encoder
  on TIS's token subsets (1 + N/2 tokens, subsets/s), under the same autocast, at the batch size the
  methods pick (``vitlens.batching.resolve_batch_size``);
* per workload, images/s and the ratio of its time to the time the bare passes it needs would take
  at that throughput (target: <= 1.2 for every forward-heavy method):
  TIS-1024 (1024 subset passes), RISE-4000 (4000 forwards), ViT-CX (1 + 2K forwards, K clustered masks),
  insertion + deletion (2 x 225 forwards, 224 steps, blur substrate), and LeGrad (forward + backward;
  no bare ratio).

Timings synchronise CUDA before reading the clock; each workload is run once untimed first (warm-up,
cuDNN autotuning, compilation with ``--compile``, whose time is reported separately).
Targets of the issue on a GPU: TIS-1024 on ViT-B/16 under 0.2 s per image at bf16.
"""
from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import torch

from _shared import REPO, SHARED, shared_model


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timed(fn, dev, repeats: int = 1) -> float:
    best = float("inf")
    for _ in range(repeats):
        sync(dev)
        t0 = time.perf_counter()
        fn()
        sync(dev)
        best = min(best, time.perf_counter() - t0)
    return best


def load(name: str, dev: torch.device, quick: bool):
    import vitlens

    if name == "vit_tiny":
        model = shared_model()
        model.module.to(dev)
        return model
    import timm

    if name == "tiny":  # a 2-block random ViT-Ti on 64 x 64 inputs: checks this script in seconds
        torch.manual_seed(0)
        m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, depth=2, num_classes=10)
        return vitlens.wrap_model(m.eval().to(dev))

    torch.manual_seed(0)
    kw = dict(depth=2) if quick else {}
    m = timm.create_model("vit_base_patch16_224", pretrained=False, **kw).eval().to(dev)
    return vitlens.wrap_model(m)


def images(model, n: int, dev: torch.device) -> torch.Tensor:
    folder = SHARED / "data" / "imagenet-val-sample" / "images"
    paths = sorted(folder.iterdir())[:n] if folder.is_dir() and tuple(model.input_size) == (224, 224) else []
    if paths:
        return model.preprocess(paths).to(dev)
    return torch.randn(n, 3, *model.input_size, generator=torch.Generator().manual_seed(0)).to(dev)


def bare_rates(model, x: torch.Tensor, precision: str, n_keep: int, repeats: int, compile: bool) -> dict:
    """Forwards/s of full images and of (1 + n_keep)-token subsets, at the methods' batch sizes."""
    from vitlens.batching import resolve_batch_size
    from vitlens.precision import perturbed_forward, perturbed_subset, runtime

    dev = x.device
    P = model.num_prefix_tokens
    n_tok = model.grid_size(x)[0] * model.grid_size(x)[1]
    out = {}
    with torch.no_grad(), runtime(precision, compile):
        bs = resolve_batch_size(None, model, n_tok + P, 4096)
        batch = x[:1].expand(bs, -1, -1, -1).contiguous()
        perturbed_forward(model, batch)
        out["forward_bs"] = bs
        out["forward_per_s"] = bs / timed(lambda: perturbed_forward(model, batch), dev, repeats)
        emb = model.embed(x[:1])
        bs = resolve_batch_size(None, model, n_keep + P, 4096)
        keep = torch.stack([torch.randperm(n_tok, generator=torch.Generator().manual_seed(i))[:n_keep].sort().values
                            for i in range(bs)]).to(dev)
        idx = torch.zeros(bs, dtype=torch.long, device=dev)
        perturbed_subset(model, emb, keep, idx)
        out["subset_bs"] = bs
        out["subset_per_s"] = bs / timed(lambda: perturbed_subset(model, emb, keep, idx), dev, repeats)
    return out


def workloads(args):
    q = args.quick
    return {
        "tis": (dict(n_masks=32 if q else 1024), "subset"),
        "rise": (dict(n_masks=64 if q else 4000), "forward"),
        "vitcx": (dict(masks="random", n_random_masks=8) if q else {}, "forward"),
        "legrad": ({}, None),
        "insertion+deletion": (dict(n_steps=8 if q else 224), "forward"),
    }


def run_workload(model, name: str, params: dict, x: torch.Tensor, precision: str, compile: bool):
    """Runs the workload on the batch ``x``; returns the number of bare passes it needs."""
    import vitlens
    from vitlens.metrics import deletion, insertion

    if name == "insertion+deletion":
        maps = torch.rand(x.shape[0], *x.shape[-2:], generator=torch.Generator().manual_seed(0)).to(x.device)
        insertion(model, x, maps, n_steps=params["n_steps"], precision=precision, compile=compile)
        deletion(model, x, maps, n_steps=params["n_steps"], precision=precision, compile=compile)
        return 2 * (params["n_steps"] + 1) * x.shape[0]
    gradient = name == "legrad"
    exp = vitlens.explain(model, x, name, progress=False, precision=precision if not gradient else None,
                          compile=compile, **params)
    if name == "tis":
        return exp.extras["n_masks"] * x.shape[0]
    if name == "rise":
        return params["n_masks"] * x.shape[0]
    if name == "vitcx":
        return sum(1 + 2 * k for k in exp.extras["n_masks"])
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--models", default="vit_base,vit_tiny")
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--workloads", default="tis,vitcx,rise,legrad,insertion+deletion")
    ap.add_argument("--images", type=int, default=None, help="images per workload (default 8, --quick 1)")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats, best kept (default 2, --quick 1)")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--quick", action="store_true", help="tiny settings (and a 2-block ViT-B) to check the script")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "gpu_bench.json"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore", RuntimeWarning)
    dev = torch.device(args.device)
    n_img = args.images or (1 if args.quick else 8)
    repeats = args.repeats or (1 if args.quick else 2)
    wl = workloads(args)
    rows = []
    for mname in args.models.split(","):
        model = load(mname, dev, args.quick)
        x = images(model, n_img, dev)
        n_tok = model.grid_size(x)[0] * model.grid_size(x)[1]
        for prec in args.precisions.split(","):
            rates = bare_rates(model, x, prec, round(0.5 * n_tok), repeats, args.compile)
            head = dict(model=mname, precision=prec, compile=args.compile, device=str(dev),
                        bare_forward_img_per_s=round(rates["forward_per_s"], 2),
                        bare_subset_per_s=round(rates["subset_per_s"], 2), forward_bs=rates["forward_bs"],
                        subset_bs=rates["subset_bs"])
            print(json.dumps(head), flush=True)
            for name in args.workloads.split(","):
                params, kind = wl[name]
                t0 = time.perf_counter()
                run_workload(model, name, params, x[:1], prec, args.compile)  # warm-up / compilation
                sync(dev)
                warm = time.perf_counter() - t0
                passes = [None]
                sec = timed(lambda: passes.__setitem__(0, run_workload(model, name, params, x, prec, args.compile)),
                            dev, repeats)
                row = dict(head, workload=name, params=params, images=n_img, s_per_image=round(sec / n_img, 4),
                           img_per_s=round(n_img / sec, 3), warmup_s=round(warm, 2))
                if kind is not None and passes[0]:
                    rate = rates["subset_per_s"] if kind == "subset" else rates["forward_per_s"]
                    row.update(bare_passes=passes[0], ratio_to_bare=round(sec / (passes[0] / rate), 3))
                rows.append(row)
                print(json.dumps(row), flush=True)
        del model
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=1))
    print("\n| model | precision | workload | s/image | images/s | ratio to bare forwards |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['precision']} | {r['workload']} | {r['s_per_image']} | {r['img_per_s']} | "
              f"{r.get('ratio_to_bare', '-')} |")


if __name__ == "__main__":
    main()
