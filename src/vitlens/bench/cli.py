"""The ``bench`` and ``report`` subcommands (wired into ``vitlens`` by :mod:`vitlens.cli`, and run
standalone by ``python -m vitlens.bench``, which is what ``torchrun -m vitlens.bench`` launches)."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence

from ..cli_common import OneLineParser, run_main
from ..errors import InputError, VitlensError


def add_bench_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--config", help="JSON or TOML file with the same keys as these options")
    p.add_argument("--preset", help="tis-vit | tis-deit | vitcx | legrad-vit | default (see vitlens.bench.presets)")
    p.add_argument("--model", help="model name (timm by default; torchvision:/hf:/open_clip: prefixes)")
    p.add_argument("--weights", help="weights file or folder, or 'random' (default: VITLENS_WEIGHTS, then the hub)")
    p.add_argument("--model-arg", action="append", default=[], metavar="K=V",
                   help="constructor argument for the model, e.g. depth=2 (repeatable)")
    p.add_argument("--data", help="ImageNet validation folder (LOC_val_solution.csv + images/), ImageNet-Segmentation "
                   "(gtsegs_ijcv.mat), OpenImages V7 points folder, or a folder of images")
    p.add_argument("--dataset", choices=["imagenet", "imagenet-seg", "openimages", "folder"],
                   help="dataset kind of --data (default: detected; see vitlens.bench.datasets)")
    p.add_argument("--methods", help="comma-separated method names (see `vitlens methods`)")
    p.add_argument("--method-param", action="append", default=[], metavar="METHOD.K=V",
                   help="method parameter, e.g. tis.n_masks=32 (repeatable)")
    p.add_argument("--metrics", help="comma-separated metrics, e.g. insertion,deletion,pointing_game")
    p.add_argument("--metric-param", action="append", default=[], metavar="METRIC.K=V",
                   help="metric protocol parameter, e.g. insertion.n_steps=16 (repeatable)")
    p.add_argument("--limit", type=int, help="use the first N selected images")
    p.add_argument("--max-box-fraction", type=float,
                   help="keep only images whose boxes cover at most this fraction of the crop (e.g. 0.5)")
    p.add_argument("--target", choices=["label", "predicted"], help="class to explain (default: label)")
    p.add_argument("--batch-size", type=int, help="images per explain()/metric call and per shard unit (default 8)")
    p.add_argument("--forward-batch-size", type=int, help="forward passes per batch inside methods/metrics")
    p.add_argument("--precision", help="fp32 | bf16 | fp16 for the perturbed forward passes of methods and metrics "
                   "(default: fp32 on CPU, bf16 on CUDA; gradient methods stay fp32)")
    p.add_argument("--compile", dest="compile", action="store_true", default=None,
                   help="torch.compile the batched forward paths (falls back to eager with a warning)")
    p.add_argument("--seed", type=int, help="seed of every random choice in methods and metrics (default 0)")
    p.add_argument("--device", help="auto (default), cpu, cuda, cuda:1 ...")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--shard", help="i/n: compute only shard i of n (merge with `vitlens report DIR`)")
    p.add_argument("--resume", dest="resume", action="store_true", default=None,
                   help="continue an existing output folder (the default)")
    p.add_argument("--no-resume", dest="resume", action="store_false", help="refuse to reuse an existing folder")
    p.add_argument("--no-report", dest="report", action="store_false", default=None,
                   help="do not write results.md/csv and report.html at the end (run `vitlens report DIR` later)")
    p.add_argument("--examples", type=int, help="example images in report.html (default 4)")
    p.add_argument("--report-subset", dest="report_subset", action="store_true", default=None,
                   help="also write this run's methods and metrics alone to OUT/this-run/ (results.md always "
                        "shows everything in OUT)")
    p.add_argument("--progress", dest="progress", action="store_true", default=None,
                   help="show progress even when VITLENS_NO_PROGRESS is set (default: a bar on a terminal, "
                        "else a line per method/metric call and at least one every 30 s, on stderr)")
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress output (the log file in OUT/logs/ still has it)")
    p.add_argument("--out", help="output folder (results.sqlite, logs/, results.md/csv, report.html)")
    p.add_argument("--transform", choices=["model", "tis"],
                   help="data pipeline: model (the model's eval transform, default) or tis (TIS evaluation code)")
    p.add_argument("--subset", help="named image subset, e.g. tis5000 (needs the full LOC_val_solution.csv); none = all images")
    p.add_argument("--print-config", action="store_true",
                   help="print the fully resolved run (every method parameter and metric protocol) and exit")
    return p


def _convert_user_params(cfg, method_params: dict, metric_params: dict, source: Optional[str] = None) -> None:
    """Check method/metric names (close matches) and convert the values of ``--method-param`` /
    ``--metric-param`` to the types the method's / metric's signature declares (one-line errors).

    ``source`` (a config file's name or ``preset NAME``): the values come from there instead of the
    command line (already parsed; messages name the file; values with no text form pass through)."""
    from .._params import convert_params
    from ..methods import get_method
    from ..metrics.base import get_metric

    mflag, tflag = ("--method-param", "--metric-param") if source is None else (f"{source}: method", f"{source}: metric")
    for spec in cfg.methods:
        method = get_method(spec.method)
        given = method_params.get(spec.label, {})
        if given:
            spec.params.update(convert_params(method.fn, given, method.defaults, owner=f"method '{spec.method}'",
                                              flag=mflag, prefix=f"{spec.label}.", objects_ok=source is not None,
                                              renamed=method.renamed, old_values=method.old_values))

    def base(name: str) -> str:  # a metric label may run another registered metric ({"metric": ...})
        p = cfg.metric_params.get(name) if isinstance(cfg.metric_params, dict) else None
        return str(p.get("metric", name)) if isinstance(p, dict) else name

    names = cfg.metrics
    if isinstance(names, dict):  # LeGrad presets: the metrics of each dataset kind
        names = [n for v in names.values() for n in (v if isinstance(v, (list, tuple)) else [v])]
    for name in names:
        get_metric(base(name))
    for name, given in (metric_params or {}).items():
        if not isinstance(given, dict):
            raise InputError(f"{tflag} {name}={given}: write METRIC.KEY=VALUE, e.g. insertion.n_steps=16.")
        given = {k: v for k, v in given.items() if k != "metric"}
        metric = get_metric(base(name))
        conv = convert_params(metric.fn, given, metric.defaults, owner=f"metric '{name}'", flag=tflag,
                              prefix=f"{name}.", objects_ok=source is not None)
        if isinstance(cfg.metric_params, dict) and isinstance(cfg.metric_params.get(name), dict):
            cfg.metric_params[name].update(conv)


def bench_main(args: argparse.Namespace) -> int:
    from .config import build_config, parse_assignments
    from .runner import run_bench

    try:
        cli = dict(model=args.model, weights=args.weights, data=args.data, dataset=args.dataset, methods=args.methods,
                   metrics=args.metrics, limit=args.limit, max_box_fraction=args.max_box_fraction,
                   target=args.target, batch_size=args.batch_size, forward_batch_size=args.forward_batch_size,
                   precision=args.precision, compile=args.compile,
                   seed=args.seed, device=args.device, threads=args.threads, shard=args.shard, resume=args.resume,
                   report=args.report, examples=args.examples, progress=args.progress, out=args.out,
                   preset=args.preset, report_subset=args.report_subset, transform=args.transform,
                   subset=args.subset)
        if args.model_arg:
            cli["model_args"] = parse_assignments(args.model_arg, "model argument")
        if args.metric_param:
            cli["metric_params"] = parse_assignments(args.metric_param, "metric parameter")
        cli["method_params"] = parse_assignments(args.method_param, "method parameter")
        user_method_params = {k: dict(v) for k, v in cli["method_params"].items() if isinstance(v, dict)}
        if args.device not in (None, "auto"):
            from ..models.loading import check_device

            check_device(args.device)
        cfg = build_config(cli, file=args.config, preset=None if (args.preset or args.config) else "default")
        if args.config or args.preset:  # the file's / preset's own values (not the command line's, checked
            # below under their own flag): the declared types, errors naming the file
            cli_mp = cli.get("metric_params") or {}

            def own(params: dict, given) -> dict:
                return {k: v for k, v in params.items() if not (isinstance(given, dict) and k in given)}

            _convert_user_params(cfg, {s.label: own(s.params, user_method_params.get(s.label)) for s in cfg.methods},
                                 {k: own(v, cli_mp.get(k)) for k, v in cfg.metric_params.items() if isinstance(v, dict)}
                                 if isinstance(cfg.metric_params, dict) else {},
                                 source=args.config or f"preset {args.preset}")
        _convert_user_params(cfg, user_method_params, cli.get("metric_params", {}))
        if args.print_config:
            from .config import resolved

            print(json.dumps(resolved(cfg), indent=1, default=str))
            return 0
        summary = run_bench(cfg)
    except VitlensError as e:
        print(f"vitlens bench: error: {e}", file=sys.stderr)
        return 2
    if "table" in summary.get("report", {}):
        print(summary["report"]["table"])
    print(f"{summary['images']} images; computed {summary['maps']} maps and {summary['rows']} rows "
          f"(shard {summary['shard']}) in {summary['seconds']:.1f} s -> {summary['out']}")
    errors = summary.get("errors") or []
    if errors:
        print(f"vitlens bench: {len(errors)} item(s) failed and were skipped (recorded in results.sqlite, "
              f"listed in results.md; details in {summary['out']}/logs/):", file=sys.stderr)
        for e in errors[:20]:
            what = e["stage"] + "".join(f" {e[k]}" for k in ("label", "metric") if e.get(k))
            print(f"  {e['image_id']}: {what}: {e['message']}", file=sys.stderr)
        if len(errors) > 20:
            print(f"  ... and {len(errors) - 20} more", file=sys.stderr)
    return 0


def report_main(args: argparse.Namespace) -> int:
    from .report import write_report

    try:
        res = write_report(args.dir, examples=args.examples)
    except VitlensError as e:
        print(f"vitlens report: error: {e}", file=sys.stderr)
        return 2
    print(res["table"])
    print(f"wrote {res['markdown']}, {res['csv']}, {res['html']}")
    n_err = sum(int(e[3]) for e in res.get("errors") or [])
    if n_err:
        print(f"vitlens report: {n_err} failed item(s) (unreadable images, method or metric errors) are listed "
              f"under 'Errors' in {res['markdown']}.", file=sys.stderr)
    return 0


def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``bench`` to an ``argparse`` subparsers object (sets ``func``)."""
    p = subparsers.add_parser("bench", help="run a resumable method x metric benchmark",
                              description="Run (or resume) a benchmark; results go to OUT/results.sqlite.")
    add_bench_arguments(p)
    p.set_defaults(func=bench_main)
    return p


def add_report_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``report`` to an ``argparse`` subparsers object (sets ``func``)."""
    p = subparsers.add_parser("report", help="write results.md, results.csv and report.html of a benchmark folder")
    p.add_argument("dir", help="benchmark output folder")
    p.add_argument("--examples", type=int, default=4, help="example images in report.html")
    p.set_defaults(func=report_main)
    return p


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m vitlens.bench``: the ``bench`` and ``report`` subcommands of ``vitlens``."""
    ap = OneLineParser(prog="python -m vitlens.bench")  # usage errors: one line, exit code 2
    sub = ap.add_subparsers(dest="command", required=True)
    add_bench_parser(sub)
    add_report_parser(sub)
    return ap


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m vitlens.bench [bench] ...`` or ``python -m vitlens.bench report DIR``: the same commands,
    options, messages and exit codes as ``vitlens bench`` / ``vitlens report`` (:func:`vitlens.cli_common.run_main`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    first = next((a for a in argv if a != "--debug"), None)
    if first not in ("bench", "report"):  # the default command (``--help`` too: bench's options)
        argv = ["bench", *argv]
    return run_main(build_parser, argv)
