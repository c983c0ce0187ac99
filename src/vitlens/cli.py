"""Command-line interface: ``vitlens explain | methods | demo | bench | report | app``.

Every error is one line on stderr (``vitlens: error: ...``) naming the input and what to do, with exit
code 2 (usage and input errors) or 1 (an unexpected failure, a bug: run again with ``--debug`` for the
traceback). Inputs are checked (method, parameters, target, device, image files, output names) before
the model is loaded.
"""
from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from ._params import INT_TEXT
from .cli_common import OneLineParser, UsageError, run_main  # noqa: F401 (UsageError: re-exported)
from .cli_common import check_device as _check_device
from .cli_common import load_from_args as _load
from .errors import InputError, VitlensError

#: Lighter settings used by ``vitlens demo`` (paper defaults with ``--full``): the demo must finish in
#: a couple of minutes on a laptop CPU.
DEMO_PARAMS: dict[str, dict] = {
    "rise": {"n_masks": 500},
    "occlusion": {"window": 32, "stride": 32},
    "integrated_gradients": {"n_steps": 16},
    "smoothgrad": {"n_samples": 16},
}
DEFAULT_METHOD = "tis"


# ----------------------------------------------------------------------------- argument conversion
def _method_info(name: str):
    from .methods import get_method

    return get_method(name)  # UnknownMethodError with close matches


def _parse_params(items: Sequence[str], method: str) -> dict:
    """``--param K=V`` values converted to the types of the method's signature."""
    from ._params import convert_params, parse_kv

    info = _method_info(method)
    return convert_params(info.fn, parse_kv(items, "--param"), info.defaults, owner=f"method '{method}'",
                          renamed=info.renamed, old_values=info.old_values)


_FLOAT = re.compile(r"[+-]?(\d+\.\d*|\.\d+|\d+(\.\d*)?[eE][+-]?\d+)")


def _parse_target(t: Optional[str]):
    if t is None:
        return None
    s = t.strip()
    if not s:
        raise InputError("--target is empty: give a class index, a class name or (CLIP) a text prompt.")
    if INT_TEXT.fullmatch(s):
        return int(s)
    if _FLOAT.fullmatch(s):
        raise InputError(f"--target {t}: a class index must be a whole number (e.g. --target {int(float(s))}).")
    return t


def _add_model_args(p: argparse.ArgumentParser) -> None:
    from .models import DEFAULT_MODEL, WEIGHTS_ENV

    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="timm model name (prefix torchvision:, hf:, open_clip: for other libraries); default %(default)s")
    p.add_argument("--weights", default=None,
                   help=f"local weights file or folder (default: ${WEIGHTS_ENV}, else download from the hub; offline, "
                        f"set {WEIGHTS_ENV}=/path/to/models or pass this); 'random' for an untrained model")
    p.add_argument("--device", default=None,
                   help="torch device: cpu, cuda, cuda:1 ... (default: cuda if available, else cpu)")


# ----------------------------------------------------------------------------- explain
def output_stems(paths: Sequence[Path]) -> list[str]:
    """Unique output names for input images: the file stem when the stems are unique; otherwise the
    path relative to the inputs' common folder (``a/img``, ``b/img``); as a last resort (``img.jpg`` and
    ``img.png`` in one folder) that path plus a short hash of the full path."""
    resolved = [Path(os.path.abspath(p)) for p in paths]
    seen: dict[Path, Path] = {}
    for p, r in zip(paths, resolved):
        if r in seen:
            raise InputError(f"image {p} is given twice; give each image once.")
        seen[r] = p
    stems = [p.stem for p in resolved]
    if len(set(stems)) == len(stems):
        return stems
    common = Path(os.path.commonpath([str(r.parent) for r in resolved]))
    rel = [r.relative_to(common).with_suffix("").as_posix() for r in resolved]
    if len(set(rel)) == len(rel):
        return rel
    return [f"{s}-{hashlib.sha1(str(r).encode()).hexdigest()[:8]}" for s, r in zip(rel, resolved)]


def _explain_to_files(model, images, names, method, target, params, out: Path, seed: int):
    import numpy as np

    from . import explain
    from .viz import save_overlay, to_pixels

    x = model.preprocess(images)
    exp = explain(model, x, method=method, target=target, seed=seed, with_scores=True, **params)
    written = []
    for i, name in enumerate(names):
        stem = f"{name}_{method}"
        (out / stem).parent.mkdir(parents=True, exist_ok=True)
        np.save(out / f"{stem}.npy", exp.maps[i].cpu().numpy().astype("float32"))
        kind = "similarity" if exp.targets[i] < 0 else "p"
        title = f"{method}: {exp.labels[i].split(',')[0]} ({kind}={float(exp.scores[i]):.3f})"
        written.append(save_overlay(out / f"{stem}.png", to_pixels(x[i], model.mean, model.std),
                                    exp.maps[i].cpu().numpy(), title))
    return exp, x, written


def cmd_explain(args) -> int:
    from .models.preprocess import load_image

    # every input is checked before the (slow) model load
    params = _parse_params(args.param, args.method)
    target = _parse_target(args.target)
    _check_device(args.device)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file, not a folder; choose another --out.")
    paths = [Path(p) for p in args.images]
    names = output_stems(paths)
    outputs = [out / f"{n}_{args.method}{ext}" for n in names for ext in (".png", ".npy")]
    existing = [p for p in outputs if p.exists()]
    if existing and not args.overwrite:
        more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
        raise InputError(f"output {existing[0]}{more} already exists; pass --overwrite to replace it, "
                         "or choose another --out.")
    images = [load_image(p, background=args.background) for p in paths]  # missing/unreadable files: one line
    model = _load(args)
    out.mkdir(parents=True, exist_ok=True)
    _, _, written = _explain_to_files(model, images, names, args.method, target, params, out, args.seed)
    for w in written:
        print(w)
    return 0


# ----------------------------------------------------------------------------- methods
def cmd_methods(args) -> int:
    from ._params import signature_line
    from .methods import method_infos

    if args.name:
        info = _method_info(args.name)
        print(f"{info.name} ({info.kind}{', token-level' if info.token_level else ''}): {info.description}")
        print()
        print(inspect.getdoc(info.fn) or "(no docstring)")
        print()
        print("parameters (--param KEY=VALUE): " + (signature_line(info.fn, info.defaults) or "none"))
        return 0
    for info in method_infos():
        print(f"{info.name:22s} {info.kind:13s} {info.description}")
        sig = signature_line(info.fn, info.defaults)
        print(f"{'':22s} params: {sig or 'none'}")
    return 0


# ----------------------------------------------------------------------------- demo
def cmd_demo(args) -> int:
    import numpy as np

    from . import explain, methods
    from .data.samples import sample_images
    from .viz import save_grid, to_pixels

    chosen = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else methods()
    for m in chosen:
        _method_info(m)  # unknown names: one line with close matches, before the model loads
    _check_device(args.device)
    model = _load(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    samples = sample_images()
    names = list(samples)
    x = model.preprocess(list(samples.values()))
    maps, notes, timings = {}, {}, {}
    predicted: dict[str, str] = {}
    for method in chosen:
        params = {} if args.full else dict(DEMO_PARAMS.get(method, {}))
        t0 = time.perf_counter()
        try:
            exp = explain(model, x, method=method, seed=args.seed, with_scores=True, **params)
        except VitlensError as e:  # a method that cannot apply to this model: leave its row empty
            print(f"  {method}: skipped ({e})", file=sys.stderr)
            continue
        timings[method] = time.perf_counter() - t0
        print(f"  {method:22s} {timings[method]:7.2f} s for {len(names)} images", file=sys.stderr)
        for i, n in enumerate(names):
            maps[(n, method)] = exp.maps[i].cpu().numpy()
            kind = "sim" if exp.targets[i] < 0 else "p"
            predicted.setdefault(n, f"{exp.labels[i].split(',')[0]} ({kind}={float(exp.scores[i]):.2f})")
            np.save(out / f"{n}_{method}.npy", exp.maps[i].cpu().numpy().astype("float32"))
    done = [m for m in chosen if m in timings]
    imgs = [to_pixels(x[i], model.mean, model.std) for i in range(len(names))]
    path = save_grid(out / "demo_grid.png", imgs, names, done, maps, captions=predicted,
                     timings=timings)
    (out / "demo_timings.json").write_text(json.dumps(timings, indent=1))
    print(f"wrote {path.resolve()}")
    return 0


# ----------------------------------------------------------------------------- parser and main
def _version() -> str:
    try:
        from importlib.metadata import version

        return version("vitlens")
    except Exception:
        from . import __version__

        return __version__


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="vitlens", description="Explain what a Vision Transformer looks at.",
                      epilog="Add --debug anywhere to see the Python traceback of an error.")
    p.add_argument("--version", action="version", version=f"vitlens {_version()}",
                   help="print the vitlens version and exit")
    p.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = p.add_subparsers(dest="command", required=True, metavar="{explain,methods,demo,bench,report,app}")

    e = sub.add_parser("explain", help="explain images with one method; writes overlay PNGs and .npy maps",
                       description="Explain images with one method; writes OUT/<name>_<method>.png (overlay) and "
                                   ".npy (the map in [0, 1] at the model's input resolution).")
    e.add_argument("images", nargs="+", help="image files (any format PIL opens)")
    e.add_argument("--method", default=DEFAULT_METHOD,
                   help="explanation method (default: %(default)s, Transformer Input Sampling; "
                        "list them with `vitlens methods`)")
    e.add_argument("--target", default=None,
                   help="class index, class name or (CLIP) text prompt; default: the predicted class")
    e.add_argument("--out", default="vitlens-out",
                   help="output folder (default %(default)s); images with the same file name in different "
                        "folders keep their relative paths below it")
    e.add_argument("--overwrite", action="store_true", help="replace existing output files (refused by default)")
    e.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="method parameter, converted to the type the method declares, e.g. n_masks=64 "
                        "(repeatable; `vitlens methods NAME` lists them)")
    e.add_argument("--seed", type=int, default=0, help="seed of every random choice (default %(default)s)")
    e.add_argument("--background", choices=["white", "black"], default="white",
                   help="colour transparent pixels (RGBA, LA, palette) are composited on (default %(default)s)")
    _add_model_args(e)
    e.set_defaults(func=cmd_explain)

    m = sub.add_parser("methods", help="list the methods with their parameters, or show one method's documentation",
                       description="Without NAME: every method with its kind, description and parameters "
                                   "(defaults). With NAME: that method's documentation.")
    m.add_argument("name", nargs="?", help="a method name: print its docstring and parameters")
    m.set_defaults(func=cmd_methods)

    d = sub.add_parser("demo", help="every method on the built-in sample images; writes a comparison grid PNG")
    d.add_argument("--out", default="vitlens-out/demo", help="output folder (default %(default)s)")
    d.add_argument("--methods", default=None, help="comma-separated subset of methods (default: all)")
    d.add_argument("--full", action="store_true", help="paper-default settings for every method (slower)")
    d.add_argument("--seed", type=int, default=0, help="seed of every random choice (default %(default)s)")
    _add_model_args(d)
    d.set_defaults(func=cmd_demo)

    try:
        from .bench.cli import add_bench_parser, add_report_parser
    except ImportError:
        pass
    else:
        add_bench_parser(sub)
        add_report_parser(sub)
    from .app.cli import add_app_parser

    add_app_parser(sub, _add_model_args)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``vitlens ...``: every error is one line on stderr (see :func:`vitlens.cli_common.run_main`)."""
    return run_main(build_parser, argv)


if __name__ == "__main__":
    raise SystemExit(main())
