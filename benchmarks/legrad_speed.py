"""LeGrad's time against the bare cost of one forward plus one backward pass, measured in the same run.

    python benchmarks/legrad_speed.py [--batch 4] [--repeats 5] [--threads 1] [--layers all|2|0.4]

The baseline is the model's own forward (``module(x)``) on an input that requires grad, followed by
one ``torch.autograd.grad`` of the target logits w.r.t. the input (a plain gradient saliency: one
full backward through every block). LeGrad is ``vitlens.explain(method="legrad")`` including its
min-max normalisation and upsampling. Uses the real ViT-Ti from ../shared when present, else a
randomly initialised ViT-Ti (timings do not depend on the weights). Prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def _load_model():
    import vitlens

    from _shared import MODEL, SHARED

    if (SHARED / "models").is_dir():
        from _shared import shared_model

        return shared_model(), "shared"
    return vitlens.load_model(MODEL, weights="random"), "random"


def _once(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def _timeit_interleaved(fns, repeats: int, device: torch.device) -> list[float]:
    """Median time of each function; runs alternate so that machine load hits all of them alike."""
    for fn in fns:
        fn()  # warm-up
    times = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            times[i].append(_once(fn, device))
    return [statistics.median(t) for t in times]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--layers", default="none",
                    help="'none' (every block), a count from the end, a fraction (0.4: the paper), or 0,3,5")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import vitlens

    model, weights = _load_model()
    model.module.to(args.device)
    dev = model.device
    from vitlens._params import convert_params
    from vitlens.methods import get_method

    info = get_method("legrad")
    layers = convert_params(info.fn, {"layers": args.layers}, info.defaults, owner="legrad", flag="--layers")["layers"]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, *model.input_size, generator=g).to(dev)
    target = torch.arange(args.batch, device=dev) * 7 % 1000

    def fwd_bwd():
        xi = x.detach().requires_grad_(True)
        out = model.module(xi)
        torch.autograd.grad(out.gather(1, target[:, None]).sum(), xi)

    def run_legrad():
        vitlens.explain(model, x, method="legrad", target=target.tolist(), layers=layers, progress=False)

    t_base, t_legrad = _timeit_interleaved([fwd_bwd, run_legrad], args.repeats, dev)
    res = dict(model=model.name, weights=weights, device=str(dev), threads=torch.get_num_threads(),
               batch=args.batch, layers=args.layers,
               forward_backward_s_per_image=t_base / args.batch, legrad_s_per_image=t_legrad / args.batch,
               ratio=t_legrad / t_base)
    print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
