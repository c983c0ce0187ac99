"""How the runner calls metrics: registry lookup, protocol keys, data arguments, result normalisation
(values, curves and their abscissa, the counts of pooled metrics)."""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch

from .._params import check_param_names
from ..errors import InputError
from ..metrics.base import available_metrics, get_metric
from .store import key_of

#: keyword arguments that carry per-image data, not protocol (never part of the protocol key): box masks
#: and their exact coverage, labels, masks and points (see bench.datasets), box coordinates on the input
#: grid (TIS pointing game), and the methods' raw native-resolution maps (``raw_maps``: token maps or
#: unnormalised pixel maps, float32)
DATA_KWARGS = ("boxes", "coverage", "labels", "masks", "points", "point_labels", "box_coords", "raw_maps")
#: data the runner provides only to metrics that accept it (never required through ``needs``)
OPTIONAL_DATA = ("box_coords", "raw_maps")
#: keyword arguments naming the explainer (metrics that re-run it, e.g. max-sensitivity): set per method entry
METHOD_KWARGS = ("explainer", "method", "method_params")


@dataclass
class BoundMetric:
    """A metric with its full protocol (defaults + overrides) and the protocol's key."""

    name: str
    fn: Any
    higher_is_better: bool
    needs: tuple
    protocol: dict
    key: str
    accepts: frozenset
    base: str = ""  # the registered metric a label runs (``insertion`` for ``insertion_black``)

    def __call__(self, model, x, maps, targets, data: dict, batch_size: Optional[int],
                 method: Optional[str] = None, method_params: Optional[dict] = None) -> dict:
        kwargs = dict(self.protocol)
        if "method" in self.accepts and method is not None:
            kwargs["method"] = method
            kwargs["method_params"] = dict(method_params or {})
        for k in DATA_KWARGS:
            if k in self.needs or (k in self.accepts and k in data):
                if k not in data:
                    raise InputError(f"metric '{self.name}' needs '{k}', which this dataset does not provide "
                                     "(see vitlens.bench.datasets for which dataset gives what).")
                kwargs[k] = data[k]
        if "batch_size" in self.accepts:
            kwargs["batch_size"] = batch_size
        if "progress" in self.accepts:
            kwargs["progress"] = False
        res = self.fn(model, x, maps, targets, **kwargs)
        values = getattr(res, "values", res)
        curves = getattr(res, "curves", None)
        xs = getattr(res, "xs", None)
        out = dict(values=_np(values).reshape(-1))
        out["curves"] = None if curves is None else _np(curves)
        out["xs"] = None if xs is None else _np(xs).reshape(-1)
        out["protocol"] = dict(getattr(res, "protocol", None) or {})  # as run: defaults resolved, rules named
        counts = (getattr(res, "extras", None) or {}).get("counts")
        # per-image counts of pooled metrics (segmentation mIoU, open-vocabulary p-mIoU): the rows' counts
        # column (integers, exact in float32); see .pooled
        out["counts"] = None if counts is None else _np(counts)
        return out


def _np(t: Any) -> np.ndarray:
    if isinstance(t, torch.Tensor):
        return t.detach().float().cpu().numpy()
    return np.asarray(t, dtype=np.float32)


def available() -> list[str]:
    """Names of the registered metrics."""
    return available_metrics()


def bind(name: str, overrides: Optional[dict] = None) -> BoundMetric:
    """Look up metric ``name`` and fill its protocol: defaults, then ``overrides``.

    ``overrides["metric"]`` makes ``name`` a label for another registered metric, so one run can hold
    several protocols of the same metric (e.g. ``insertion_black`` = insertion with ``substrate="black"``);
    the label names the results' column and the base metric is part of the protocol key."""
    overrides = dict(overrides or {})
    metric = str(overrides.pop("metric", name))
    info = get_metric(metric)
    unsupported = set(info.needs) - set(DATA_KWARGS)
    if unsupported:
        raise InputError(f"metric '{name}' needs {', '.join(sorted(unsupported))}, which vitlens bench does not "
                         f"provide (it provides: {', '.join(DATA_KWARGS)}).")
    accepts = frozenset(inspect.signature(info.fn).parameters)
    protocol = {k: v for k, v in info.defaults.items() if k not in DATA_KWARGS + METHOD_KWARGS}
    check_param_names(overrides, protocol, owner=f"metric '{name}'")
    protocol.update(overrides)
    key = key_of(dict(metric=name, protocol=protocol)) if metric == name else \
        key_of(dict(metric=metric, label=name, protocol=protocol))
    return BoundMetric(name, info.fn, bool(info.higher_is_better), tuple(info.needs), protocol, key, accepts,
                       metric)
