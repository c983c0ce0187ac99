"""The benchmark configuration: from command-line options, a JSON/TOML file, and presets.

A config file holds the same keys as the command line (dashes or underscores)::

    model = "vit_tiny_patch16_224.augreg_in21k_ft_in1k"
    weights = "../shared/models"
    data = "../shared/data/imagenet-val-sample"
    out = "runs/vit-ti"
    metrics = ["insertion", "deletion", "pointing_game"]
    limit = 200
    max_box_fraction = 0.5
    [methods.tis]            # one table per method entry; keys are the method's parameters
    n_masks = 1024
    [methods.tis-fast]       # an entry may name another method, to compare parameter settings
    method = "tis"
    n_masks = 32
    [metric_params.insertion]
    steps = 56

Precedence: preset < config file < command-line options. ``--metric-param`` values are merged into the
preset's protocol of that metric; ``--methods a,b`` on top of a preset selects entries and keeps the
preset's parameters for them (``--method-param`` then overrides single parameters).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

from ..errors import InputError


@dataclass
class MethodSpec:
    """One column of the benchmark: a label, the registered method it runs and its parameters."""

    label: str
    method: str
    params: dict = field(default_factory=dict)


@dataclass
class BenchConfig:
    """Everything that determines a benchmark run (see the module docstring and ``vitlens bench -h``)."""

    out: str = "vitlens-bench"
    model: str = "vit_tiny_patch16_224.augreg_in21k_ft_in1k"
    weights: Optional[str] = None
    model_args: dict = field(default_factory=dict)
    data: Optional[str] = None
    dataset: Optional[str] = None                        # imagenet | imagenet-seg | openimages | folder (None: detect)
    methods: list = field(default_factory=list)          # list[MethodSpec] after normalise()
    metrics: list = field(default_factory=list)          # list[str], or {dataset kind: list[str]}
    metric_params: dict = field(default_factory=dict)    # metric -> protocol overrides
    limit: Optional[int] = None
    max_box_fraction: Optional[float] = None             # keep images whose boxes cover <= this fraction
    target: str = "label"                                # "label" (ground truth) | "predicted"
    batch_size: int = 8                                  # images per explain()/metric call (the shard unit)
    forward_batch_size: Optional[int] = None             # forward passes per batch inside methods/metrics
    precision: Optional[str] = None                      # fp32|bf16|fp16 perturbed forwards (None: fp32 CPU, bf16 CUDA)
    compile: bool = False                                # torch.compile the batched forward paths
    seed: int = 0
    device: str = "auto"
    threads: Optional[int] = None
    shard: Optional[str] = None                          # "i/n"
    resume: bool = True
    report: bool = True
    examples: int = 4
    report_subset: bool = False                          # also write this run's own view to OUT/this-run/
    progress: Optional[bool] = None
    preset: Optional[str] = None
    transform: str = "model"                             # "model" (the model's eval transform) | "tis"
    subset: Optional[str] = None                         # a named subset, e.g. "tis5000"

    def normalise(self) -> "BenchConfig":
        self.methods = parse_methods(self.methods)
        if isinstance(self.metrics, str):
            self.metrics = [m.strip() for m in self.metrics.split(",") if m.strip()]
        if not self.methods:
            raise InputError("no methods given (use --methods tis,... or a preset).")
        if not self.metrics:
            raise InputError("no metrics given (use --metrics insertion,deletion,pointing_game or a preset).")
        if isinstance(self.metrics, dict):  # per dataset kind (the LeGrad presets): see bench.datasets
            from .datasets import KINDS

            bad = set(self.metrics) - set(KINDS)
            if bad:
                raise InputError(f"metrics per dataset: unknown dataset kind(s) {', '.join(sorted(bad))}; "
                                 f"known: {', '.join(KINDS)}.")
        if self.target not in ("label", "predicted"):
            raise InputError(f"target must be 'label' or 'predicted', got '{self.target}'.")
        from ..precision import check_precision

        self.precision = check_precision(self.precision)
        if int(self.batch_size) < 1:
            raise InputError(f"batch_size must be >= 1, got {self.batch_size}.")
        from ..data.subsets import SUBSETS
        from ..data.transforms import check_transform

        check_transform(self.transform)
        if isinstance(self.subset, str) and self.subset.lower() in ("", "none", "all"):
            self.subset = None  # --subset none: every image of --data (overrides a preset's subset)
        if self.subset is not None and self.subset not in SUBSETS:
            raise InputError(f"unknown subset '{self.subset}'; choose one of {', '.join(SUBSETS)}.")
        labels = [m.label for m in self.methods]
        if len(set(labels)) != len(labels):
            raise InputError(f"duplicate method labels: {labels}.")
        return self

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["methods"] = {m.label: dict(method=m.method, **m.params) for m in parse_methods(self.methods)}
        return d


def parse_methods(methods: Any) -> list[MethodSpec]:
    """Accept "a,b", ["a", "b"], {"label": {"method": ..., **params}} or MethodSpec objects."""
    if isinstance(methods, str):
        methods = [m.strip() for m in methods.split(",") if m.strip()]
    out: list[MethodSpec] = []
    if isinstance(methods, dict):
        for label, spec in methods.items():
            spec = dict(spec or {})
            method = spec.pop("method", label)
            params = spec.pop("params", {})
            params.update(spec)
            out.append(MethodSpec(str(label), str(method), params))
        return out
    for m in methods or []:
        if isinstance(m, MethodSpec):
            out.append(m)
        elif isinstance(m, dict):
            m = dict(m)
            method = m.pop("method")
            label = m.pop("label", method)
            params = m.pop("params", {})
            params.update(m)
            out.append(MethodSpec(label, method, params))
        else:
            out.append(MethodSpec(str(m), str(m), {}))
    return out


def read_config_file(path: str) -> dict:
    """A JSON (``.json``) or TOML (anything else) config file as a dict with underscore keys."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"config file not found: {p}")
    text = p.read_text()
    if p.suffix.lower() == ".json":
        data = json.loads(text)
    else:
        import tomllib

        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise InputError(f"cannot parse TOML config {p}: {e}") from None
    known = {f.name for f in fields(BenchConfig)}
    data = {k.replace("-", "_"): v for k, v in data.items()}
    unknown = set(data) - known
    if unknown:
        raise InputError(f"unknown key(s) in {p}: {', '.join(sorted(unknown))}; known: {', '.join(sorted(known))}.")
    return data


def parse_value(v: str) -> Any:
    """Command-line ``k=v`` values: JSON when it parses (numbers, true/false, lists), else the string."""
    try:
        return json.loads(v)
    except (json.JSONDecodeError, ValueError):
        return v


def parse_assignments(items: list[str], what: str) -> dict:
    """``["tis.n_masks=32", ...]`` -> ``{"tis": {"n_masks": 32}}``; ``["depth=2"]`` -> ``{"depth": 2}``."""
    out: dict = {}
    for item in items or []:
        if "=" not in item:
            raise InputError(f"{what} must look like key=value, got '{item}'.")
        k, v = item.split("=", 1)
        if "." in k and what != "model argument":
            head, sub = k.split(".", 1)
            out.setdefault(head, {})[sub] = parse_value(v)
        else:
            out[k] = parse_value(v)
    return out


def build_config(cli: dict, file: Optional[str] = None, preset: Optional[str] = None) -> BenchConfig:
    """Merge preset < file < command line (``None`` command-line values do not override)."""
    from .presets import get_preset

    merged: dict = {}
    file_data = read_config_file(file) if file else {}
    preset = cli.get("preset") or file_data.get("preset") or preset
    if preset:
        merged.update(get_preset(preset))
        merged["preset"] = preset
    preset_methods = merged.get("methods")
    merged.update(file_data)
    method_params = cli.pop("method_params", None) or {}
    for k, v in cli.items():
        if v is None:
            continue
        if k == "metric_params" and isinstance(merged.get(k), dict):  # per-metric merge: keep the preset's rest
            mp = {m: dict(p) for m, p in merged[k].items()}
            for m, p in v.items():
                mp.setdefault(m, {}).update(p)
            merged[k] = mp
        elif k == "methods" and isinstance(preset_methods, dict) and isinstance(v, (str, list)):
            # a list of names selects method entries; entries of the preset keep the preset's parameters
            names = [m.strip() for m in v.split(",") if m.strip()] if isinstance(v, str) else list(v)
            merged[k] = {n: dict(preset_methods.get(n, {})) if isinstance(n, str) else n for n in names}
        else:
            merged[k] = v
    cfg = BenchConfig(**merged)
    cfg.methods = parse_methods(cfg.methods)
    for spec in cfg.methods:
        spec.params.update(method_params.get(spec.label, {}))
    unknown = set(method_params) - {m.label for m in cfg.methods}
    if unknown:
        raise InputError(f"--method-param names method(s) not in the run: {', '.join(sorted(unknown))}.")
    return cfg.normalise()


def resolved(cfg: BenchConfig) -> dict:
    """The fully resolved run (what ``vitlens bench --print-config`` prints): the config with every method
    entry's parameters completed by the method's defaults and every metric's full protocol (defaults +
    overrides, with the registered metric it runs)."""
    from ..methods import get_method
    from .metrics_bridge import bind

    d = cfg.to_dict()
    methods = {}
    for spec in parse_methods(cfg.methods):
        try:
            params = dict(get_method(spec.method).defaults)  # the parameters (runtime arguments are not)
        except Exception as e:
            raise InputError(str(e)) from None
        params.update(spec.params)
        methods[spec.label] = dict(method=spec.method, **params)
    d["methods"] = methods
    def protocols(names) -> dict:
        out = {}
        for name in names:
            over = dict(cfg.metric_params.get(name) or {})
            out[name] = dict(metric=over.get("metric", name), **bind(name, over).protocol)
        return out

    if isinstance(cfg.metrics, dict):  # per dataset kind
        d["metrics"] = {kind: protocols(names) for kind, names in cfg.metrics.items()}
    else:
        d["metrics"] = protocols(cfg.metrics)
    d.pop("metric_params", None)
    return d
