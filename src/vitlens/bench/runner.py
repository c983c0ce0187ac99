"""``run_bench``: run (or resume) a benchmark: plan it (:mod:`.plan`), compute what is missing
(:mod:`.execute`), merge and report (:mod:`.finish`).

One runner per folder (or shard): :mod:`.lock`. Before the model loads, the method entries, metrics and
dataset are checked (one-line errors). A folder written by an earlier release resumes under the current
run keys (:mod:`.legacy_keys`). Targets: ``label`` explains the ground-truth class; ``predicted`` the
model's top-1 class (per dataset, see :mod:`.datasets`: ImageNet-Segmentation has no labels, OpenImages
explains each annotated class's prompt). The code version (``vitlens.__version__`` + git hash) is
recorded in every row but is not part of any key, so resuming after upgrading the code continues the
same run.
"""
from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD
from ..errors import InputError
from . import distributed
from .config import BenchConfig
from .datasets import BenchDataset
from .execute import execute, record_plan
from .finish import finish
from .legacy_keys import rekey_legacy_runs
from .lock import RunLock, lock_paths
from .plan import check_methods, make_plan, open_data
from .shards import SHARD_DIR, merge_shards, shard_path, shard_suffix
from .store import MAIN_DB, Store


def run_bench(cfg: BenchConfig) -> dict:
    """Run (or resume) the benchmark described by ``cfg``; returns a summary dict (see :func:`.finish.finish`)."""
    import vitlens

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
    suffix = shard_suffix(info.index, info.count) if info.sharded else ""
    log = _logger(out / "logs" / f"bench{suffix}.log")
    run_lock: Optional[RunLock] = None
    try:
        methods = check_methods(cfg)  # before loading anything heavy
        data, metrics = open_data(cfg)
        run_lock = RunLock(*lock_paths(out, suffix), log=lambda m: (log.warning(m), print(m, file=sys.stderr)))
        run_lock.acquire()  # refuses a second runner on the same folder (or shard) with a clear error
        torch.manual_seed(cfg.seed)  # a random-weights model is the same in every process
        model = vitlens.load_model(cfg.model, weights=cfg.weights, device=device, **cfg.model_args)
        model.module.eval()
        if cfg.transform == "tis":  # ImageNet-normalised inputs: pixel-space substrates and overlays follow
            model.set_input_normalisation(IMAGENET_MEAN, IMAGENET_STD)
        data.prepare_model(model)
        _preflight(cfg, data, model)
        plan = make_plan(cfg, data, model, methods, metrics, info, device)
        if info.count == 1 and (out / SHARD_DIR).is_dir():  # earlier --shard runs: count their work as done
            merge_shards(out)
        store = Store(shard_path(out, info.index, info.count) if info.sharded else main_db, also=[main_db])
        rekey_legacy_runs(store, cfg, plan, model, log)
        record_plan(store, cfg, plan, data)
        log.info("start: %d images selected, %d batches of %d, this shard %d/%d has %d batches; methods %s; "
                 "metrics %s; device %s; version %s", len(plan.items), len(plan.batches), int(cfg.batch_size),
                 info.index, info.count, len(plan.mine), [s.label for s in cfg.methods], cfg.metrics, device,
                 plan.version)
        computed, errors, _ = execute(cfg, plan, model, data, store, info, log)
        return finish(cfg, plan, info, computed, errors, t_start, log)
    finally:
        if run_lock is not None:
            run_lock.release()
        distributed.finish(created)


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


def _preflight(cfg: BenchConfig, data: BenchDataset, model) -> None:
    """Configuration errors that would fail on every image are raised before the run starts (inside the
    run, failures are recorded per image and skipped, so these must not get that far): the target rule
    the dataset cannot serve (``label`` without labels) and a dataset that needs a text model."""
    items = list(getattr(data, "items", []))[:1]
    if not items:
        return
    no_labels = getattr(data, "kind", "") == "imagenet-seg" or all(it.label < 0 for it in data.items)
    if (cfg.target == "label" and no_labels) or getattr(data, "kind", "") == "openimages":
        data.targets(cfg.target, model, items, None)  # these rules need no image: raises the dataset's message
