"""``run_bench``: compute every missing (image, method) map and (image, method, metric) row.

Order of work, per batch of ``batch_size`` images (the shard unit, see :mod:`.distributed`):

1. for each method entry, the images without a stored map are explained in one
   :func:`vitlens.explain` call; the maps are stored (float16, compressed) in one transaction;
2. for each metric, the images without a row are evaluated in one call on the *stored* maps (decoded
   from float16, so a resumed run and an uninterrupted one see identical maps); the rows are stored in
   one transaction.

Nothing is recomputed that is committed in the run's database or in the merged ``results.sqlite``.
Targets: ``label`` explains the ground-truth class; ``predicted`` the model's top-1 class (per dataset, see
:mod:`.datasets`: ImageNet-Segmentation has no labels, OpenImages explains each annotated class's prompt).
The code version (``vitlens.__version__`` + git hash) is recorded in every row but is not part of any
key, so resuming after upgrading the code continues the same run.
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..errors import InputError
from . import distributed
from ..precision import resolve_precision, runtime as precision_runtime
from .config import BenchConfig, MethodSpec
from .datasets import BenchDataset as BenchData, Item, metrics_for, open_dataset
from .metrics_bridge import BoundMetric, bind
from .store import Store, key_of, merge_into

MAIN_DB = "results.sqlite"
_RUNTIME = ("seed", "batch_size", "progress", "precision", "compile")  # explain() arguments, not method parameters
SHARD_DIR = "shards"


# ------------------------------------------------------------------------------------------- helpers
def code_version() -> str:
    """``vitlens.__version__`` plus ``+g<hash>`` when the package lives in a git checkout."""
    from .. import __version__

    here = Path(__file__).resolve().parent
    try:
        h = subprocess.run(["git", "-C", str(here), "rev-parse", "--short", "HEAD"], capture_output=True,
                           text=True, timeout=10)
        if h.returncode == 0 and h.stdout.strip():
            return f"{__version__}+g{h.stdout.strip()}"
    except (OSError, subprocess.SubprocessError):
        pass
    return __version__


def weights_id(model: str, weights: Optional[str]) -> str:
    """A stable identity of the weights: file name + size for files, else the spec itself."""
    from ..models.loading import WEIGHTS_ENV, find_weights

    spec = weights if weights is not None else os.environ.get(WEIGHTS_ENV)
    if spec is None:
        return "hub"
    if spec == "random":
        return "random"
    try:
        f = find_weights(model.split(":")[-1], spec)
        return f"{f.name}:{f.stat().st_size}"
    except Exception:
        return str(spec)


def _device(spec: str, info: distributed.ShardInfo) -> torch.device:
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", info.local_rank % torch.cuda.device_count())
        return torch.device("cpu")
    dev = torch.device(spec)
    if dev.type == "cuda" and dev.index is None and info.world > 1:
        dev = torch.device("cuda", info.local_rank % torch.cuda.device_count())
    return dev


def _logger(path: Path) -> logging.Logger:
    log = logging.getLogger(f"vitlens.bench.{path}")
    log.setLevel(logging.INFO)
    log.propagate = False
    if not log.handlers:
        path.parent.mkdir(parents=True, exist_ok=True)
        h = logging.FileHandler(path)
        h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(h)
    return log


class _Progress:
    """One bar: images done, per-method and metric rates (images/s of compute), ETA."""

    def __init__(self, total: int, enabled: Optional[bool], desc: str):
        from tqdm.auto import tqdm

        if enabled is None:
            enabled = sys.stderr.isatty() and not os.environ.get("VITLENS_NO_PROGRESS")
        self.bar = tqdm(total=total, desc=desc, unit="img", disable=not enabled, dynamic_ncols=True)
        self.secs: dict[str, float] = {}
        self.count: dict[str, int] = {}

    def timed(self, key: str, n: int, secs: float) -> None:
        self.secs[key] = self.secs.get(key, 0.0) + secs
        self.count[key] = self.count.get(key, 0) + n
        self.bar.set_postfix_str(" ".join(f"{k} {self.count[k] / max(self.secs[k], 1e-9):.2f}/s"
                                          for k in self.secs), refresh=False)

    def update(self, n: int) -> None:
        self.bar.update(n)

    def close(self) -> None:
        self.bar.close()


# -------------------------------------------------------------------------------------------- runner
def select_items(cfg: BenchConfig, data: BenchData, model) -> tuple[list[Item], np.ndarray]:
    items = list(data.items)
    cov = data.coverage(items, model.input_size, model.crop_pct)
    if cfg.max_box_fraction is not None:
        if data.boxes is None:
            raise InputError("--max-box-fraction needs a dataset with boxes (LOC_val_solution.csv).")
        keep = [i for i, c in enumerate(cov) if c <= cfg.max_box_fraction]
        items, cov = [items[i] for i in keep], cov[keep]
    if cfg.limit is not None:
        items, cov = items[: int(cfg.limit)], cov[: int(cfg.limit)]
    if not items:
        raise InputError("no images selected (check --data, --limit and --max-box-fraction).")
    return items, cov


def load_images(model, paths: list) -> torch.Tensor:
    """The model's own eval transform; the generic one (resize short side to size/crop_pct, centre crop)
    when the former does not produce the model's input size (e.g. timm models built with ``img_size``)."""
    x = model.preprocess(paths)
    if tuple(x.shape[-2:]) != tuple(model.input_size):
        from ..models.preprocess import preprocess_images

        x = preprocess_images(paths, size=model.input_size, mean=model.mean, std=model.std, crop_pct=model.crop_pct,
                              interpolation=getattr(model, "interpolation", "bicubic")).to(model.device)
    return x


def run_bench(cfg: BenchConfig) -> dict:
    """Run (or resume) the benchmark described by ``cfg``; returns a summary dict."""
    import vitlens
    from ..methods import get_method

    cfg.normalise()
    t_start = time.perf_counter()
    out = Path(cfg.out)
    main_db = out / MAIN_DB
    if not cfg.resume and main_db.exists():
        raise InputError(f"{out} already holds results; resume (the default) or choose another --out.")
    info = distributed.shard_info(cfg.shard)
    device = _device(cfg.device, info)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    created = distributed.init(info, device.type)
    suffix = f".shard-{info.index}-of-{info.count}" if info.sharded else ""
    log = _logger(out / "logs" / f"bench{suffix}.log")
    db_path = out / SHARD_DIR / f"results{suffix}.sqlite" if info.sharded else main_db
    try:
        # validate methods and metrics before loading anything heavy
        method_infos = {}
        for spec in cfg.methods:
            try:
                method_infos[spec.label] = get_method(spec.method)
            except Exception as e:
                raise InputError(str(e)) from None
            runtime = set(spec.params) & set(_RUNTIME)
            if runtime:
                raise InputError(f"method entry '{spec.label}': {', '.join(sorted(runtime))} are run settings, not "
                                 "method parameters (use --seed / --forward-batch-size).")
            unknown = set(spec.params) - set(method_infos[spec.label].defaults)
            if unknown:
                raise InputError(f"unknown parameter(s) for method '{spec.method}': {', '.join(sorted(unknown))}; "
                                 f"it accepts: {', '.join(sorted(method_infos[spec.label].defaults))}.")
        data = open_dataset(cfg.data, cfg.dataset)  # cheap (file lists, CSVs); decides the metrics of dict configs
        metrics: list[BoundMetric] = []
        for name in metrics_for(cfg.metrics, data.kind):
            try:
                metrics.append(bind(name, cfg.metric_params.get(name)))
            except InputError:
                raise
            except Exception as e:
                raise InputError(str(e)) from None
        data.check_metrics(metrics)

        torch.manual_seed(cfg.seed)  # a random-weights model is the same in every process
        model = vitlens.load_model(cfg.model, weights=cfg.weights, device=device, **cfg.model_args)
        model.module.eval()
        data.prepare_model(model)
        items, cov = select_items(cfg, data, model)
        B = int(cfg.batch_size)
        batches = [items[k:k + B] for k in range(0, len(items), B)]
        mine = [b for k, b in enumerate(batches) if info.owns(k)]
        version = code_version()
        wid = weights_id(cfg.model, cfg.weights)
        model_info = dict(input_size=list(model.input_size), crop_pct=model.crop_pct,
                          interpolation=getattr(model, "interpolation", "bicubic"), mean=list(model.mean),
                          std=list(model.std))
        if info.count == 1 and (out / SHARD_DIR).is_dir():  # earlier --shard runs: count their work as done
            from .report import merge_shards

            merge_shards(out)
        store = Store(db_path, also=[main_db])
        precision = resolve_precision(cfg.precision, device)
        run_keys: dict[str, str] = {}
        full_params: dict[str, dict] = {}
        for spec in cfg.methods:
            params = {k: v for k, v in method_infos[spec.label].defaults.items() if k not in _RUNTIME}
            params.update(spec.params)
            full_params[spec.label] = params
            key = dict(model=cfg.model, weights=wid, model_args=cfg.model_args, method=spec.method, params=params,
                       seed=cfg.seed, target=cfg.target, input_size=list(model.input_size))
            if precision != "fp32":  # reduced-precision maps and rows are a different run (fp32 keys unchanged)
                key["precision"] = precision
            run_keys[spec.label] = key_of(key)
            store.put_run(run_keys[spec.label], label=spec.label, model=cfg.model, weights=wid, method=spec.method,
                          method_params=params, target_rule=cfg.target, seed=cfg.seed, model_info=model_info,
                          version=version)
        for m in metrics:
            store.put_protocol(m.key, m.name, m.protocol, m.higher_is_better)
        store.put_meta({"config": cfg.to_dict(), "version": version})
        store.put_images([(it.image_id, str(it.path), it.label, it.synset, None if np.isnan(c) else float(c))
                          for it, c in zip(items, cov)])
        log.info("start: %d images selected, %d batches of %d, this shard %d/%d has %d batches; methods %s; "
                 "metrics %s; device %s; version %s", len(items), len(batches), B, info.index, info.count,
                 len(mine), [s.label for s in cfg.methods], cfg.metrics, device, version)

        n_mine = sum(len(b) for b in mine)
        bar = _Progress(n_mine, cfg.progress, f"bench {info.index}/{info.count}" if info.sharded else "bench")
        computed = dict(maps=0, rows=0)
        try:
            with precision_runtime(precision, bool(cfg.compile)):
                for batch in mine:
                    _run_batch(cfg, model, data, batch, store, run_keys, full_params, metrics, version, bar,
                               computed, log)
                    bar.update(len(batch))
        finally:
            bar.close()
            store.close()
        log.info("shard done: %d maps and %d rows computed", computed["maps"], computed["rows"])
        distributed.barrier(info)
        summary = dict(out=str(out), images=len(items), shard=f"{info.index}/{info.count}", **computed,
                       seconds=time.perf_counter() - t_start, rank=info.rank)
        if info.rank == 0 and (info.world > 1 or not info.sharded):
            if info.world > 1:  # every rank passed the barrier: nobody writes the shard files any more
                base = info.index - info.rank  # this launch's shards: base .. base + world - 1
                merge_into(main_db, [out / SHARD_DIR / f"results.shard-{base + r}-of-{info.count}.sqlite"
                                     for r in range(info.world)])
            if cfg.report:
                from .report import write_report

                summary["report"] = write_report(out, run_keys=list(run_keys.values()),
                                                 protocol_keys=[m.key for m in metrics], examples=cfg.examples)
            summary["seconds"] = time.perf_counter() - t_start
        log.info("finished in %.1f s", summary["seconds"])
        return summary
    finally:
        distributed.finish(created)


def _run_batch(cfg: BenchConfig, model, data: BenchData, batch: list[Item], store: Store,
               run_keys: dict, full_params: dict, metrics: list[BoundMetric], version: str, bar: _Progress,
               computed: dict, log: logging.Logger) -> None:
    import vitlens

    ids = [it.image_id for it in batch]
    cache: dict = {}

    def images() -> torch.Tensor:
        if "x" not in cache:
            cache["x"] = data.load(model, batch)
        return cache["x"]

    def batch_data() -> dict:
        if "data" not in cache:
            cache["data"] = data.data_for(batch, model.input_size, model.crop_pct)
        return cache["data"]

    for spec in cfg.methods:
        rk = run_keys[spec.label]
        have = store.done_maps(rk, ids)
        todo = [i for i, iid in enumerate(ids) if iid not in have]
        if todo:
            x = images()[todo]
            tg, keep = data.targets(cfg.target, model, [batch[i] for i in todo], x)
            t0 = time.perf_counter()
            exp = vitlens.explain(model, x, method=spec.method, target=tg, seed=cfg.seed,
                                  batch_size=cfg.forward_batch_size, progress=False, **spec.params)
            secs = time.perf_counter() - t0
            store.put_maps(rk, [ids[i] for i in todo], exp.targets.tolist() if keep is None else keep, exp.numpy(),
                           secs, version)
            bar.timed(spec.label, len(todo), secs)
            computed["maps"] += len(todo)
            log.info("maps %s: %d images (%s) in %.2f s", spec.label, len(todo), ids[todo[0]], secs)
        for m in metrics:
            have = store.done_results(rk, m.name, m.key, ids)
            todo = [i for i, iid in enumerate(ids) if iid not in have]
            if not todo:
                continue
            maps, tg = store.get_maps(rk, [ids[i] for i in todo])
            x = images()[todo]
            d = {k: v[todo] for k, v in batch_data().items()}
            t0 = time.perf_counter()
            res = m(model, x, torch.from_numpy(maps).to(x.device), tg, d, cfg.forward_batch_size,
                    method=spec.method, method_params=spec.params)
            secs = time.perf_counter() - t0
            rows = []
            for j, i in enumerate(todo):
                rows.append(dict(run_key=rk, image_id=ids[i], metric=m.name, protocol_key=m.key, model=cfg.model,
                                 method=spec.label, value=float(res["values"][j]),
                                 curve=None if res["curves"] is None else res["curves"][j], xs=res["xs"],
                                 target=tg[j], method_params=full_params[spec.label], protocol=m.protocol,
                                 version=version, seconds=secs / len(todo)))
            store.put_results(rows)
            bar.timed("metrics", len(todo), secs)
            log.info("%s %s: %d images in %.2f s", m.name, spec.label, len(todo), secs)
            computed["rows"] += len(rows)
