"""Command-line interface: ``vitlens explain | methods | demo | bench | report``."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from .errors import VitlensError

#: Lighter settings used by ``vitlens demo`` (paper defaults with ``--full``): the demo must finish in
#: a couple of minutes on a laptop CPU.
DEMO_PARAMS: dict[str, dict] = {
    "rise": {"n_masks": 500},
    "occlusion": {"window": 32, "stride": 32},
    "integrated_gradients": {"n_steps": 16},
    "smoothgrad": {"n_samples": 16},
}


def _parse_value(v: str):
    try:
        return json.loads(v)
    except json.JSONDecodeError:
        return v


def _parse_params(items: Sequence[str]) -> dict:
    out = {}
    for kv in items or []:
        if "=" not in kv:
            raise VitlensError(f"--param expects KEY=VALUE, got '{kv}'.")
        k, v = kv.split("=", 1)
        out[k.strip()] = _parse_value(v)
    return out


def _parse_target(t: Optional[str]):
    if t is None:
        return None
    return int(t) if t.lstrip("-").isdigit() else t


def _add_model_args(p: argparse.ArgumentParser) -> None:
    from .models import DEFAULT_MODEL, WEIGHTS_ENV

    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="timm model name (prefix torchvision:, hf:, open_clip: for other libraries); default %(default)s")
    p.add_argument("--weights", default=None,
                   help=f"local weights file or folder (default: ${WEIGHTS_ENV}, else download from the hub); 'random' for untrained")
    p.add_argument("--device", default=None, help="torch device, e.g. cuda or cpu (default: cuda if available)")


def _load(args):
    import torch

    from .models import load_model

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return load_model(args.model, weights=args.weights, device=device)


def _explain_to_files(model, paths_or_images, names, method, target, params, out: Path, seed: int):
    import numpy as np

    from . import explain
    from .viz import save_overlay, to_pixels

    x = model.preprocess(paths_or_images)
    exp = explain(model, x, method=method, target=target, seed=seed, with_scores=True, **params)
    written = []
    for i, name in enumerate(names):
        stem = f"{name}_{method}"
        np.save(out / f"{stem}.npy", exp.maps[i].cpu().numpy().astype("float32"))
        kind = "similarity" if exp.targets[i] < 0 else "p"
        title = f"{method}: {exp.labels[i].split(',')[0]} ({kind}={float(exp.scores[i]):.3f})"
        written.append(save_overlay(out / f"{stem}.png", to_pixels(x[i], model.mean, model.std),
                                    exp.maps[i].cpu().numpy(), title))
    return exp, x, written


def cmd_explain(args) -> int:
    model = _load(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    params = _parse_params(args.param)
    paths = [Path(p) for p in args.images]
    names = [p.stem for p in paths]
    target = _parse_target(args.target)
    from .models.preprocess import load_image

    images = [load_image(p) for p in paths]  # clear error for missing/unreadable files before any work
    _, _, written = _explain_to_files(model, images, names, args.method, target, params, out, args.seed)
    for w in written:
        print(w)
    return 0


def cmd_methods(args) -> int:
    from .methods import method_infos

    for info in method_infos():
        print(f"{info.name:22s} {info.kind:13s} {info.description}")
    return 0


def cmd_demo(args) -> int:
    import torch

    from . import explain, methods
    from .data.samples import sample_images
    from .viz import save_grid, to_pixels

    model = _load(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    samples = sample_images()
    names = list(samples)
    x = model.preprocess(list(samples.values()))
    chosen = args.methods.split(",") if args.methods else methods()
    maps, notes, timings = {}, {}, {}
    for method in chosen:
        params = {} if args.full else dict(DEMO_PARAMS.get(method, {}))
        t0 = time.perf_counter()
        try:
            exp = explain(model, x, method=method, seed=args.seed, with_scores=True, **params)
        except VitlensError as e:  # a method that cannot apply to this model: leave its column empty
            print(f"  {method}: skipped ({e})", file=sys.stderr)
            continue
        timings[method] = time.perf_counter() - t0
        print(f"  {method:22s} {timings[method]:7.2f} s for {len(names)} images", file=sys.stderr)
        for i, n in enumerate(names):
            maps[(n, method)] = exp.maps[i].cpu().numpy()
            notes[(n, method)] = f"{exp.labels[i].split(',')[0][:18]} p={float(exp.scores[i]):.2f}"
        for i, n in enumerate(names):
            import numpy as np

            np.save(out / f"{n}_{method}.npy", exp.maps[i].cpu().numpy().astype("float32"))
    done = [m for m in chosen if m in timings]
    imgs = [to_pixels(x[i], model.mean, model.std) for i in range(len(names))]
    path = save_grid(out / "demo_grid.png", imgs, names, done, maps, notes=notes)
    (out / "demo_timings.json").write_text(json.dumps(timings, indent=1))
    print(f"wrote {path.resolve()}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vitlens", description="Explain what a Vision Transformer looks at.")
    sub = p.add_subparsers(dest="command", required=True)

    e = sub.add_parser("explain", help="explain images with one method; writes overlay PNGs and .npy maps")
    e.add_argument("images", nargs="+", help="image files")
    e.add_argument("--method", default="tis", help="explanation method (see `vitlens methods`)")
    e.add_argument("--target", default=None, help="class index, class name or (CLIP) text prompt; default: predicted class")
    e.add_argument("--out", default="vitlens-out", help="output folder (default %(default)s)")
    e.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", help="method parameter (repeatable)")
    e.add_argument("--seed", type=int, default=0)
    _add_model_args(e)
    e.set_defaults(func=cmd_explain)

    m = sub.add_parser("methods", help="list the available methods")
    m.set_defaults(func=cmd_methods)

    d = sub.add_parser("demo", help="every method on the built-in sample images; writes a comparison grid PNG")
    d.add_argument("--out", default="vitlens-out/demo", help="output folder (default %(default)s)")
    d.add_argument("--methods", default=None, help="comma-separated subset of methods (default: all)")
    d.add_argument("--full", action="store_true", help="paper-default settings for every method (slower)")
    d.add_argument("--seed", type=int, default=0)
    _add_model_args(d)
    d.set_defaults(func=cmd_demo)

    try:
        from .bench.cli import add_bench_parser, add_report_parser
    except ImportError:
        pass
    else:
        add_bench_parser(sub)
        add_report_parser(sub)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except VitlensError as e:
        print(f"vitlens: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vitlens: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
