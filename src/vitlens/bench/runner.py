"""``run_bench``: compute every missing (image, method) map and (image, method, metric) row.

Order of work, per batch of ``batch_size`` images (the shard unit, see :mod:`.distributed`):

1. for each method entry, the images without a stored map are explained in one
   :func:`vitlens.explain` call; the maps are stored (float16, compressed) in one transaction;
2. for each metric, the images without a row are evaluated in one call on the *stored* maps (decoded
   from float16, so a resumed run and an uninterrupted one see identical maps); the rows are stored in
   one transaction.

Nothing is recomputed that is committed in the run's database or in the merged ``results.sqlite``.
One runner per folder (or shard): :mod:`.lock`. Progress lines, heartbeat and ETA: :mod:`.progress`.
Bad data (an unreadable image, a method or metric raising on an image) is isolated per image, recorded as
an ``errors`` row and skipped (:mod:`.faults`); the next batch is decoded in the background while the
current one computes (:mod:`.pipeline`).
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

from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD
from ..errors import InputError
from . import distributed
from ..precision import resolve_precision, runtime as precision_runtime
from .config import BenchConfig
from .datasets import BenchDataset as BenchData, Item, metrics_for, open_dataset
from .faults import describe_error, run_isolated
from .lock import RunLock, lock_paths
from .metrics_bridge import BoundMetric, bind
from .pipeline import Prefetcher
from .progress import BenchProgress
from .store import Store, key_of, merge_into

MAIN_DB = "results.sqlite"
RAW_SUFFIX = ":raw"  # run key suffix of the raw native-resolution maps (float32) in the maps table
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


# -------------------------------------------------------------------------------------------- runner
def select_items(cfg: BenchConfig, data: BenchData, model) -> tuple[list[Item], np.ndarray]:
    items = list(data.items)
    if cfg.subset is not None:
        items = _subset_items(cfg.subset, data, items)
    cov = _robust(lambda its: data.coverage(its, model.input_size, model.crop_pct), items)
    if cfg.max_box_fraction is not None:
        if data.boxes is None:
            raise InputError("--max-box-fraction needs a dataset with boxes (LOC_val_solution.csv).")
        # NaN coverage = the image could not be read: kept, so the run records and reports it
        keep = [i for i, c in enumerate(cov) if not c > cfg.max_box_fraction]
        items, cov = [items[i] for i in keep], cov[keep]
    if cfg.limit is not None:
        items, cov = items[: int(cfg.limit)], cov[: int(cfg.limit)]
    if not items:
        raise InputError("no images selected (check --data, --limit and --max-box-fraction).")
    return items, cov


def _subset_items(name: str, data: BenchData, items: list[Item]) -> list[Item]:
    """The items of a named subset (:mod:`vitlens.data.subsets`) in the subset's order; images of the
    subset missing on disk are skipped."""
    from ..data.subsets import read_solution, resolve_subset

    if data.boxes is None:
        raise InputError(f"--subset {name} needs an ImageNet validation folder with LOC_val_solution.csv.")
    ids = resolve_subset(name, read_solution(data.root / "LOC_val_solution.csv"))
    by_id = {it.image_id: it for it in items}
    return [by_id[i] for i in ids if i in by_id]


def _robust(fn, items: list) -> np.ndarray:
    """``fn(items)`` (per-image floats, e.g. box coverage), item by item where it fails; NaN for an image
    that cannot be read (the run records it as an error when it reaches the image)."""
    try:
        return np.asarray(fn(items), dtype=np.float64)
    except Exception:
        out = []
        for it in items:
            try:
                out.append(float(np.asarray(fn([it]), dtype=np.float64)[0]))
            except Exception:
                out.append(float("nan"))
        return np.asarray(out, dtype=np.float64)


def load_images(model, paths: list, transform: str = "model") -> torch.Tensor:
    """The model's own eval transform; the generic one (resize short side to size/crop_pct, centre crop)
    when the former does not produce the model's input size (e.g. timm models built with ``img_size``).
    ``transform="tis"``: the TIS evaluation pipeline (:mod:`vitlens.data.transforms`)."""
    if transform == "tis":
        from ..data.transforms import tis_images

        x = tis_images(paths).to(model.device)
        if tuple(x.shape[-2:]) != tuple(model.input_size):
            raise InputError(f"the 'tis' transform produces 224 x 224 inputs; the model expects {model.input_size}.")
        return x
    x = model.preprocess(paths)
    if tuple(x.shape[-2:]) != tuple(model.input_size):
        from ..models.preprocess import preprocess_images

        x = preprocess_images(paths, size=model.input_size, mean=model.mean, std=model.std, crop_pct=model.crop_pct,
                              interpolation=getattr(model, "interpolation", "bicubic")).to(model.device)
    return x


def _reads_raw(m: BoundMetric) -> bool:
    return "raw_maps" in m.accepts and m.protocol.get("protocol") == "tis_code"


def normalised_and_raw(exp, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """From an ``explain(normalise=False)`` result: the maps ``explain()`` returns by default
    (min-max per token map, bilinear upsampling, min-max again; the same operations in the same order)
    and the raw native-resolution maps (token maps of token-level methods, else the raw pixel maps)."""
    from ..explanation import minmax, upsample

    if exp.token_maps is not None:
        norm = minmax(upsample(minmax(exp.token_maps.float()), size))
        raw = exp.token_maps
    else:
        norm = minmax(exp.maps.float())
        raw = exp.maps
    return norm.detach().cpu().numpy(), raw.detach().float().cpu().numpy()


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
    run_lock: Optional[RunLock] = None
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
        if cfg.transform != "model" and data.kind not in ("imagenet", "folder"):
            raise InputError(f"--transform {cfg.transform} applies to ImageNet folders and plain image folders, "
                             f"not to the {data.describe()}.")
        data.transform = cfg.transform  # the data pipeline (images and boxes): "model" or "tis"
        metrics: list[BoundMetric] = []
        for name in metrics_for(cfg.metrics, data.kind):
            try:
                metrics.append(bind(name, cfg.metric_params.get(name)))
            except InputError:
                raise
            except Exception as e:
                raise InputError(str(e)) from None
        data.check_metrics(metrics)

        run_lock = RunLock(*lock_paths(out, suffix), log=lambda m: (log.warning(m), print(m, file=sys.stderr)))
        run_lock.acquire()  # refuses a second runner on the same folder (or shard) with a clear error
        torch.manual_seed(cfg.seed)  # a random-weights model is the same in every process
        model = vitlens.load_model(cfg.model, weights=cfg.weights, device=device, **cfg.model_args)
        model.module.eval()
        if cfg.transform == "tis":  # ImageNet-normalised inputs: pixel-space substrates and overlays follow
            model.set_input_normalisation(IMAGENET_MEAN, IMAGENET_STD)
        data.prepare_model(model)
        _preflight(cfg, data, model)
        items, cov = select_items(cfg, data, model)
        B = int(cfg.batch_size)
        batches = [items[k:k + B] for k in range(0, len(items), B)]
        mine = [b for k, b in enumerate(batches) if info.owns(k)]
        version = code_version()
        wid = weights_id(cfg.model, cfg.weights)
        model_info = dict(input_size=list(model.input_size), crop_pct=model.crop_pct,
                          interpolation=getattr(model, "interpolation", "bicubic"), mean=list(model.mean),
                          std=list(model.std), transform=cfg.transform)
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
            if cfg.transform != "model":  # the data pipeline changes the maps ("model" keeps old keys)
                key["transform"] = cfg.transform
            run_keys[spec.label] = key_of(key)
            store.put_run(run_keys[spec.label], label=spec.label, model=cfg.model, weights=wid, method=spec.method,
                          method_params=params, target_rule=cfg.target, seed=cfg.seed, model_info=model_info,
                          version=version)
        for m in metrics:
            store.put_protocol(m.key, m.name, m.protocol, m.higher_is_better, base=m.base or m.name)
        store.put_meta({"config": cfg.to_dict(), "version": version, **_class_meta(data)})
        store.put_images([(it.image_id, str(it.path), it.label, it.synset, None if np.isnan(c) else float(c))
                          for it, c in zip(items, cov)])
        log.info("start: %d images selected, %d batches of %d, this shard %d/%d has %d batches; methods %s; "
                 "metrics %s; device %s; version %s", len(items), len(batches), B, info.index, info.count,
                 len(mine), [s.label for s in cfg.methods], cfg.metrics, device, version)

        bar, pending = _start_progress(cfg, info, store, mine, run_keys, metrics, log)
        computed = dict(maps=0, rows=0)
        errors: list[dict] = []
        t_loop = time.perf_counter()
        loader = Prefetcher()  # decodes batch k + 1 while batch k computes
        if os.environ.get("VITLENS_BENCH_WRITER", "1") not in ("0", "false", "no"):
            store.start_writer()  # compresses and commits maps and rows in a background thread
        try:
            with precision_runtime(precision, bool(cfg.compile)):  # methods' and metrics' perturbed passes
                for k, batch in enumerate(mine):
                    nxt = mine[k + 1] if k + 1 < len(mine) else None
                    ahead = None
                    if nxt is not None and any(it.image_id in pending for it in nxt):
                        def ahead(k=k, nxt=nxt):
                            loader.submit(k + 1, lambda: _decode(model, data, nxt, log))
                    _run_batch(cfg, model, data, batch, store, run_keys, full_params, metrics, version, bar,
                               computed, log, errors, decoded=loader.take(k), ahead=ahead)
        finally:
            loader.close()
            bar.close()
            store.close()
        # throughput accounting (benchmarks/bench_overhead.py): the loop's wall time vs its calls' own time
        computed["loop_seconds"] = time.perf_counter() - t_loop
        computed["compute_seconds"] = sum(bar.secs.values())
        log.info("shard done: %d maps and %d rows computed, %d errors", computed["maps"], computed["rows"],
                 len(errors))
        distributed.barrier(info)
        summary = dict(out=str(out), images=len(items), shard=f"{info.index}/{info.count}", **computed,
                       seconds=time.perf_counter() - t_start, rank=info.rank, errors=errors)
        if info.rank == 0 and (info.world > 1 or not info.sharded):
            if info.world > 1:  # every rank passed the barrier: nobody writes the shard files any more
                base = info.index - info.rank  # this launch's shards: base .. base + world - 1
                merge_into(main_db, [out / SHARD_DIR / f"results.shard-{base + r}-of-{info.count}.sqlite"
                                     for r in range(info.world)])
            if cfg.report:
                from .report import write_report

                # results.md/csv and report.html always show everything the folder's database holds;
                # this run's own view only when asked (--report-subset: OUT/this-run/)
                summary["report"] = write_report(out, examples=cfg.examples)
                if getattr(cfg, "report_subset", False):
                    summary["subset_report"] = write_report(out, run_keys=list(run_keys.values()),
                                                            protocol_keys=[m.key for m in metrics],
                                                            examples=cfg.examples, subset="this-run")
            summary["seconds"] = time.perf_counter() - t_start
        log.info("finished in %.1f s", summary["seconds"])
        return summary
    finally:
        if run_lock is not None:
            run_lock.release()
        distributed.finish(created)


def _preflight(cfg: BenchConfig, data: BenchData, model) -> None:
    """Configuration errors that would fail on every image are raised before the run starts (inside the
    run, failures are recorded per image and skipped, so these must not get that far): the target rule
    the dataset cannot serve (``label`` without labels) and a dataset that needs a text model."""
    items = list(getattr(data, "items", []))[:1]
    if not items:
        return
    no_labels = getattr(data, "kind", "") == "imagenet-seg" or all(it.label < 0 for it in data.items)
    if (cfg.target == "label" and no_labels) or getattr(data, "kind", "") == "openimages":
        data.targets(cfg.target, model, items, None)  # these rules need no image: raises the dataset's message


def _class_meta(data: BenchData) -> dict:
    """Class names for the report (``LOC_synset_mapping.txt`` order = class index)."""
    src = getattr(data, "boxes", None)
    names = getattr(src, "class_names", None) or getattr(data, "class_names", None)
    if not names:
        return {}
    return {"class_names": list(names)}


def _start_progress(cfg: BenchConfig, info, store: Store, mine: list, run_keys: dict,
                    metrics: list[BoundMetric], log: logging.Logger) -> BenchProgress:
    """Count what this process's images already have, print the start line, start the progress output."""
    ids = {it.image_id for b in mine for it in b}
    n = len(ids)
    maps_total, maps_done, rows_total, rows_done = {}, {}, {}, {}
    pending: set = set()  # images with some work left
    for spec in cfg.methods:
        rk = run_keys[spec.label]
        maps_total[spec.label] = n
        have = store.map_ids(rk) & ids
        maps_done[spec.label] = len(have)
        pending |= ids - have
        for m in metrics:
            rows_total[(m.name, spec.label)] = n
            have = store.result_ids(rk, m.name, m.key) & ids
            rows_done[(m.name, spec.label)] = len(have)
            pending |= ids - have
    desc = f"bench {info.index}/{info.count}" if info.sharded else "bench"
    bar = BenchProgress(maps_total, maps_done, rows_total, rows_done, enabled=cfg.progress, log=log, desc=desc)
    line = (f"{bar.start_line()} ({n} images, {len(cfg.methods)} methods, {len(metrics)} metrics"
            + (f", shard {info.index}/{info.count}" if info.sharded else "") + f") -> {cfg.out}")
    bar.emit(line)
    if not bar.enabled and cfg.progress is not False:  # what a resume found is always shown
        print(f"vitlens bench: {line}", file=sys.stderr, flush=True)
    return bar, pending


def _image_message(path, e: BaseException) -> str:
    msg = describe_error(e)
    return msg if str(path) in msg else f"{msg} ({path})"


def _decode(model, data: BenchData, batch: list[Item], log: logging.Logger) -> tuple:
    """Decode the batch's images and ground truth, image by image where the batch fails (thread-safe:
    no store access; runs in the :class:`.pipeline.Prefetcher` thread for the next batch)."""

    def load(sel: list) -> tuple:
        items = [batch[i] for i in sel]
        return data.load(model, items), data.data_for(items, model.input_size, model.crop_pct)

    return run_isolated(load, range(len(batch)), log=log.warning)


def _load_batch(model, data: BenchData, batch: list[Item], store: Store, version: str,
                log: logging.Logger, errors: list, emit=None,
                decoded: Optional[tuple] = None) -> tuple[dict, Optional[torch.Tensor], dict]:
    """The batch decoded (by :func:`_decode`, here or ahead of time); unreadable images recorded.

    Returns ``(row, x, data)``: ``row[i]`` is batch image ``i``'s row in ``x``/``data`` (readable images
    only); unreadable images are recorded as ``image`` errors and left out."""
    paths = [it.path for it in batch]
    chunks, failed = decoded if decoded is not None else _decode(model, data, batch, log)
    _record(store, [dict(image_id=batch[i].image_id, stage="image", message=_image_message(paths[i], e),
                         version=version) for i, e in failed.items()], errors, log, emit)
    if not chunks:
        return {}, None, {}
    row, k = {}, 0
    for c in chunks:
        for i in c.indices:
            row[i] = k
            k += 1
    x = torch.cat([c.result[0] for c in chunks])
    d = {key: _concat([c.result[1][key] for c in chunks]) for key in chunks[0].result[1]}
    store.clear_image_errors([batch[i].image_id for i in row])
    return row, x, d


def _concat(parts: list):
    """Per-image data of several chunks: tensors concatenated, lists (e.g. box coordinates) joined."""
    if isinstance(parts[0], torch.Tensor):
        return torch.cat(parts)
    return [v for p in parts for v in p]


def _take(v, rows: list):
    return v[rows] if isinstance(v, torch.Tensor) else [v[r] for r in rows]


def _record(store: Store, rows: list, errors: list, log: logging.Logger, emit=None) -> list:
    """Store failed work as ``errors`` rows and report each one (progress output, else the log file)."""
    if rows:
        store.put_errors(rows)
        errors.extend(rows)
        for r in rows:
            what = ("unreadable image" if r["stage"] == "image" else
                    f"{r.get('metric') or 'method'} on {r.get('label')} failed")
            line = f"skipped {r['image_id']} ({what}): {r['message']}"
            if emit is not None:
                emit(line, logging.WARNING)
            else:
                log.warning(line)
    return rows


def _run_batch(cfg: BenchConfig, model, data: BenchData, batch: list[Item], store: Store,
               run_keys: dict, full_params: dict, metrics: list[BoundMetric], version: str, bar: BenchProgress,
               computed: dict, log: logging.Logger, errors: list, decoded: Optional[tuple] = None,
               ahead=None) -> None:
    """Every missing map and row of one batch; failures are recorded (``errors`` rows), never raised.
    ``decoded``: the batch as :func:`_decode` returns it, if it was decoded ahead of time; ``ahead()``
    starts decoding the next batch (called once this batch's images are available)."""
    import vitlens

    ids = [it.image_id for it in batch]
    cache: dict = {}

    def loaded() -> dict:
        """Batch index -> row of the decoded images (readable images only); decodes on first use."""
        if "row" not in cache:
            cache["row"], cache["x"], cache["data"] = _load_batch(model, data, batch, store, version, log, errors,
                                                                  bar.emit, decoded)
            if ahead is not None:
                ahead()
        return cache["row"]

    def images(sel: list) -> torch.Tensor:
        return cache["x"][[loaded()[i] for i in sel]]

    def batch_data(sel: list) -> dict:
        rows = [loaded()[i] for i in sel]
        return {k: _take(v, rows) for k, v in cache["data"].items()}

    # metrics whose protocol reads the raw native maps (the TIS code's); older stores without raw maps are
    # only recomputed when such a metric is asked for
    raw_needed = any(_reads_raw(m) for m in metrics)
    for spec in cfg.methods:
        rk = run_keys[spec.label]
        have = store.done_maps(rk, ids)
        if raw_needed:  # raw maps are stored beside the normalised ones (run key + RAW_SUFFIX, float32)
            have &= store.done_maps(rk + RAW_SUFFIX, ids)
        todo = [i for i, iid in enumerate(ids) if iid not in have]
        if todo:
            ok = [i for i in todo if i in loaded()]
            bar.skip(("map", spec.label), len(todo) - len(ok))
        if todo and ok:
            what = f"maps {spec.label}"
            bar.begin(what, len(ok), ids[ok[0]] if ok else "")

            def explain(sel: list, spec=spec) -> tuple:
                x = images(sel)
                tg, keep = data.targets(cfg.target, model, [batch[i] for i in sel], x)
                exp = vitlens.explain(model, x, method=spec.method, target=tg, seed=cfg.seed,
                                      batch_size=cfg.forward_batch_size, progress=False, normalise=False,
                                      **spec.params)
                norm_maps, raw = normalised_and_raw(exp, tuple(x.shape[-2:]))
                return exp.targets.tolist() if keep is None else keep, norm_maps, raw

            chunks, failed = run_isolated(explain, ok, log=log.warning)
            for c in chunks:
                sel_ids = [ids[i] for i in c.indices]
                store.put_maps(rk, sel_ids, c.result[0], c.result[1], c.seconds, version)
                # the raw native maps (float32) beside them, for the tis_code metrics
                store.put_maps(rk + RAW_SUFFIX, sel_ids, c.result[0], c.result[2], 0.0, version, dtype="float32")
                computed["maps"] += len(c.indices)
            _record(store, [dict(image_id=ids[i], stage="method", run_key=rk, label=spec.label,
                                 message=describe_error(e), version=version) for i, e in failed.items()],
                    errors, log, bar.emit)
            secs = sum(c.seconds for c in chunks)
            bar.end(("map", spec.label), what, len(ok) - len(failed), secs, len(failed))
        have_maps = store.done_maps(rk, ids)
        if raw_needed:
            have_maps &= store.done_maps(rk + RAW_SUFFIX, ids)
        for m in metrics:
            have = store.done_results(rk, m.name, m.key, ids)
            todo = [i for i, iid in enumerate(ids) if iid not in have]
            if not todo:
                continue
            ok = [i for i in todo if ids[i] in have_maps and i in loaded()]
            bar.skip(("row", m.name, spec.label), len(todo) - len(ok))
            if not ok:
                continue
            what = f"{m.name} {spec.label}"
            bar.begin(what, len(ok), ids[ok[0]])

            def evaluate(sel: list, m=m, rk=rk, spec=spec) -> tuple:
                maps, tg = store.get_maps(rk, [ids[i] for i in sel])
                x = images(sel)
                d = batch_data(sel)
                if _reads_raw(m):
                    d["raw_maps"] = torch.from_numpy(store.get_maps(rk + RAW_SUFFIX, [ids[i] for i in sel])[0])
                res = m(model, x, torch.from_numpy(maps).to(x.device), tg, d, cfg.forward_batch_size,
                        method=spec.method, method_params=spec.params)
                return res, tg

            chunks, failed = run_isolated(evaluate, ok, log=log.warning)
            for c in chunks:
                res, tg = c.result
                rows = []
                for j, i in enumerate(c.indices):
                    rows.append(dict(run_key=rk, image_id=ids[i], metric=m.name, protocol_key=m.key,
                                     model=cfg.model, method=spec.label, value=float(res["values"][j]),
                                     curve=None if res["curves"] is None else res["curves"][j], xs=res["xs"],
                                     target=tg[j], method_params=full_params[spec.label],
                                     protocol={**m.protocol, **res.get("protocol", {})},
                                     version=version, seconds=c.seconds / len(c.indices)))
                store.put_results(rows)
                computed["rows"] += len(rows)
            _record(store, [dict(image_id=ids[i], stage="metric", run_key=rk, metric=m.name, protocol_key=m.key,
                                 label=spec.label, message=describe_error(e), version=version)
                            for i, e in failed.items()], errors, log, bar.emit)
            bar.end(("row", m.name, spec.label), what, len(ok) - len(failed), sum(c.seconds for c in chunks),
                    len(failed))
