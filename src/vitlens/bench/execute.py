"""The work of a benchmark run: record the plan in the store, then compute every missing (image, method)
map and (image, method, metric) row of this process's batches.

Order of work, per batch of ``batch_size`` images (the shard unit, see :mod:`.distributed`):

1. for each method entry, the images without a stored map are explained in one
   :func:`vitlens.explain` call; the maps are stored (float16, compressed) in one transaction, the raw
   native-resolution maps beside them (float32, run key + :data:`.store.RAW_SUFFIX`);
2. for each metric, the images without a row are evaluated in one call on the *stored* maps (decoded
   from float16, so a resumed run and an uninterrupted one see identical maps); the rows are stored in
   one transaction.

Nothing is recomputed that is committed in the run's database or in the merged ``results.sqlite``.
Progress lines, heartbeat and ETA: :mod:`.progress`. Bad data (an unreadable image, a method or metric
raising on an image) is isolated per image, recorded as an ``errors`` row and skipped (:mod:`.faults`);
the next batch is decoded in the background while the current one computes (:mod:`.pipeline`), and the
store commits in a background thread (``VITLENS_BENCH_WRITER=0``: in the loop).
"""
from __future__ import annotations

import logging
import os
import sys
import time
from typing import Optional

import numpy as np
import torch

from ..precision import runtime as precision_runtime
from .config import BenchConfig
from .datasets import BenchDataset as BenchData
from .datasets import Item
from .distributed import ShardInfo
from .faults import describe_error, run_isolated
from .metrics_bridge import BoundMetric
from .pipeline import Prefetcher
from .plan import Plan
from .progress import BenchProgress
from .store import RAW_SUFFIX, Store


def record_plan(store: Store, cfg: BenchConfig, plan: Plan, data: BenchData) -> None:
    """Describe the run in the store: its method entries (runs), metric protocols, config and images."""
    for spec in cfg.methods:
        store.put_run(plan.run_keys[spec.label], label=spec.label, model=cfg.model, weights=plan.weights,
                      method=spec.method, method_params=plan.full_params[spec.label], target_rule=cfg.target,
                      seed=cfg.seed, model_info=plan.model_info, version=plan.version)
    for m in plan.metrics:
        store.put_protocol(m.key, m.name, m.protocol, m.higher_is_better, base=m.base or m.name)
    store.put_meta({"config": cfg.to_dict(), "version": plan.version, **_class_meta(data)})
    store.put_images([(it.image_id, str(it.path), it.label, it.synset, None if np.isnan(c) else float(c))
                      for it, c in zip(plan.items, plan.coverage)])


def execute(cfg: BenchConfig, plan: Plan, model, data: BenchData, store: Store, shard: ShardInfo,
            log: logging.Logger) -> tuple[dict, list, BenchProgress]:
    """Every missing map and row of this process's batches. Returns ``(computed, errors, progress)``:
    counts of maps and rows computed (and the loop's wall and compute seconds), the failed work recorded
    as ``errors`` rows, and the progress tracker (per-call seconds)."""
    bar, pending = _start_progress(cfg, shard, store, plan.mine, plan.run_keys, plan.metrics, log)
    computed = dict(maps=0, rows=0)
    errors: list[dict] = []
    t_loop = time.perf_counter()
    loader = Prefetcher()  # decodes batch k + 1 while batch k computes
    if os.environ.get("VITLENS_BENCH_WRITER", "1") not in ("0", "false", "no"):
        store.start_writer()  # compresses and commits maps and rows in a background thread
    mine = plan.mine
    try:
        with precision_runtime(plan.precision, bool(cfg.compile)):  # methods' and metrics' perturbed passes
            for k, batch in enumerate(mine):
                nxt = mine[k + 1] if k + 1 < len(mine) else None
                ahead = None
                if nxt is not None and any(it.image_id in pending for it in nxt):
                    def ahead(k=k, nxt=nxt):
                        loader.submit(k + 1, lambda: _decode(model, data, nxt, log))
                _run_batch(cfg, plan, model, data, batch, store, bar, computed, log, errors,
                           decoded=loader.take(k), ahead=ahead)
    finally:
        loader.close()
        bar.close()
        store.close()
    # throughput accounting (benchmarks/bench_overhead.py): the loop's wall time vs its calls' own time
    computed["loop_seconds"] = time.perf_counter() - t_loop
    computed["compute_seconds"] = sum(bar.secs.values())
    return computed, errors, bar


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


def _class_meta(data: BenchData) -> dict:
    """Class names for the report (``LOC_synset_mapping.txt`` order = class index)."""
    src = getattr(data, "boxes", None)
    names = getattr(src, "class_names", None) or getattr(data, "class_names", None)
    if not names:
        return {}
    return {"class_names": list(names)}


def _start_progress(cfg: BenchConfig, info: ShardInfo, store: Store, mine: list, run_keys: dict,
                    metrics: list[BoundMetric], log: logging.Logger) -> tuple[BenchProgress, set]:
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


def _run_batch(cfg: BenchConfig, plan: Plan, model, data: BenchData, batch: list[Item], store: Store,
               bar: BenchProgress, computed: dict, log: logging.Logger, errors: list,
               decoded: Optional[tuple] = None, ahead=None) -> None:
    """Every missing map and row of one batch; failures are recorded (``errors`` rows), never raised.
    ``decoded``: the batch as :func:`_decode` returns it, if it was decoded ahead of time; ``ahead()``
    starts decoding the next batch (called once this batch's images are available)."""
    import vitlens

    run_keys, full_params, metrics, version = plan.run_keys, plan.full_params, plan.metrics, plan.version
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
                                     counts=None if res["counts"] is None else res["counts"][j],
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
