"""What a benchmark run will do, decided before any work: the checked method entries and bound metrics,
the selected images and this process's batches, and each method entry's full parameters and run key.

Run key: a hash (:func:`.store.key_of`) of everything that determines a method entry's maps
(:func:`run_key_dict`): model, weights identity, model arguments, method, full parameters (defaults
filled in, runtime arguments left out), seed, target rule, input size; plus the precision when it is
not fp32 and the data pipeline when it is not the model's own (so fp32 / model-transform keys are those
of earlier releases). The code version is recorded with every row but is not part of any key.
"""
from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from .._params import convert_params
from ..errors import InputError
from ..precision import resolve_precision
from .config import BenchConfig
from .datasets import BenchDataset, Item, metrics_for, open_dataset
from .distributed import ShardInfo
from .metrics_bridge import BoundMetric, bind
from .store import key_of


@dataclass
class Plan:
    """The resolved run (see the module docstring); labels are the method entries' labels."""

    items: list[Item]                # the selected images, in order
    coverage: np.ndarray             # per item, the share of the input its boxes cover (NaN: unknown)
    batches: list[list[Item]]        # items in batches of cfg.batch_size (the shard unit)
    mine: list[list[Item]]           # the batches this process computes
    methods: dict                    # label -> registered MethodInfo
    metrics: list[BoundMetric]
    full_params: dict[str, dict]     # label -> the method's parameters, defaults filled in
    keys: dict[str, dict]            # label -> what its run key hashes (run_key_dict)
    run_keys: dict[str, str]         # label -> run key
    version: str                     # code version recorded with every row
    weights: str                     # weights identity (weights_id)
    model_info: dict                 # input size, crop, interpolation, mean/std, transform
    precision: str                   # resolved precision of the perturbed forward passes


# ------------------------------------------------------------------------------------------ identity
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


def run_key_dict(cfg: BenchConfig, weights: str, method: str, params: dict, input_size, precision: str) -> dict:
    """What the run key of a method entry hashes (see the module docstring)."""
    key = dict(model=cfg.model, weights=weights, model_args=cfg.model_args, method=method, params=params,
               seed=cfg.seed, target=cfg.target, input_size=list(input_size))
    if precision != "fp32":  # reduced-precision maps and rows are a different run (fp32 keys unchanged)
        key["precision"] = precision
    if cfg.transform != "model":  # the data pipeline changes the maps ("model" keeps old keys)
        key["transform"] = cfg.transform
    return key


# ----------------------------------------------------------------------------------------- checking
def check_methods(cfg: BenchConfig) -> dict:
    """label -> registered method of every entry; unknown methods, unknown or renamed parameters, run
    settings given as parameters, values of the wrong type or choice: one-line errors (the same check
    :func:`vitlens.explain` makes, made before anything is loaded)."""
    from ..methods import get_method

    infos = {}
    for spec in cfg.methods:
        try:
            info = get_method(spec.method)
        except Exception as e:
            raise InputError(str(e)) from None
        owner = f"method '{spec.method}'" + (f" (entry '{spec.label}')" if spec.label != spec.method else "")
        convert_params(info.fn, spec.params, info.defaults, owner=owner, flag=None, objects_ok=True,
                       renamed=info.renamed, old_values=info.old_values)  # checks only: the values stay as given
        infos[spec.label] = info
    return infos


def open_data(cfg: BenchConfig) -> tuple[BenchDataset, list[BoundMetric]]:
    """The dataset of ``cfg.data`` (cheap: file lists, CSVs) with its data pipeline set, and the metrics
    bound to their protocols (the metrics of dict configs depend on the dataset kind); a metric the dataset
    cannot serve is a one-line error."""
    data = open_dataset(cfg.data, cfg.dataset)
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
    return data, metrics


# ---------------------------------------------------------------------------------------- selection
def select_items(cfg: BenchConfig, data: BenchDataset, model) -> tuple[list[Item], np.ndarray]:
    """The images of the run (``--subset``, ``--max-box-fraction``, ``--limit``) and their box coverage."""
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


def _subset_items(name: str, data: BenchDataset, items: list[Item]) -> list[Item]:
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


# ------------------------------------------------------------------------------------------- the plan
def make_plan(cfg: BenchConfig, data: BenchDataset, model, methods: dict, metrics: list[BoundMetric],
              shard: ShardInfo, device) -> Plan:
    """The :class:`Plan` of ``cfg`` on the loaded ``model`` for this process (``shard``)."""
    items, cov = select_items(cfg, data, model)
    B = int(cfg.batch_size)
    batches = [items[k:k + B] for k in range(0, len(items), B)]
    mine = [b for k, b in enumerate(batches) if shard.owns(k)]
    wid = weights_id(cfg.model, cfg.weights)
    model_info = dict(input_size=list(model.input_size), crop_pct=model.crop_pct,
                      interpolation=getattr(model, "interpolation", "bicubic"), mean=list(model.mean),
                      std=list(model.std), transform=cfg.transform)
    precision = resolve_precision(cfg.precision, device)
    full_params, keys, run_keys = {}, {}, {}
    for spec in cfg.methods:
        params = dict(methods[spec.label].defaults)  # the method's parameters (runtime arguments are not)
        params.update(spec.params)
        full_params[spec.label] = params
        keys[spec.label] = run_key_dict(cfg, wid, spec.method, params, model.input_size, precision)
        run_keys[spec.label] = key_of(keys[spec.label])
    return Plan(items, cov, batches, mine, methods, metrics, full_params, keys, run_keys, code_version(), wid,
                model_info, precision)
