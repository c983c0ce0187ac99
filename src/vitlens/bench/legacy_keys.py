"""Resuming folders written by vitlens 0.1, whose run keys hash the methods' parameters under their old
names: ``start_layer`` / ``layer`` / ``n_layers`` (now ``layers``, :mod:`vitlens.models.layers`), ViT-CX's
``feature`` (now ``site``), LeGrad's ``layers="paper" | "all" | "released"`` (now ``0.4 | None | 2``),
Grad-CAM's ``site=None`` (now ``"input"``).

For a method entry of a renamed method, :func:`legacy_param_candidates` gives the full parameter dicts
0.1 would have used for the same maps; :func:`rekey_legacy_runs` computes each one's run key (the same
key dict, ``params`` replaced) and, where the folder holds a run under it, renames that run to the
current key (:meth:`.store.Store.rename_run`: runs, maps and raw maps, results, errors; the run's
parameters are rewritten in the new vocabulary), so the folder resumes instead of recomputing. A folder
holding 0.1 runs of the method that no candidate matches (parameters with no 0.1 equivalent, e.g. a
``layers`` selection that is not a suffix of the blocks) is recomputed, with a one-line message saying why.
"""
from __future__ import annotations

import logging
import sys
from typing import Any, Optional

from ..errors import InputError
from ..models.layers import take_indices
from .store import Store, key_of

#: the 0.1 parameters (name: default) of every method whose parameters were renamed since
V01_PARAMS: dict[str, dict[str, Any]] = {
    "rollout": dict(head_fusion="mean", discard_ratio=0.0, start_layer=0, variant="paper"),
    "chefer1": dict(start_layer=0, matmul_rule="normalize"),
    "chefer2": dict(score="auto", start_layer=0),
    "tam": dict(steps=20, start_layer=0, score="auto"),
    "bt_head": dict(steps=20, start_layer=3, score="auto"),
    "bt_token": dict(steps=20, start_layer=3, score="auto"),
    "textspan": dict(n_layers=4, contrast="none"),
    "legrad": dict(layers="paper", score="auto", pooling="auto", correction=None, correction_prompt="a photo of a",
                   correction_threshold=0.8),
    "gradcam": dict(score="auto", layer=None, site=None, weight_tokens=None, variant="default"),
    "attention_cam": dict(score="auto", layer=-1, variant="chefer", grad_mean=None, relu=None, head_reduce=None),
    "raw_attention": dict(layer=-1, head_fusion="mean"),
    "scorecam": dict(layer=-1, site="norm1", weights="cic", baseline="zero", score="auto"),
    "vitcx": dict(layer=None, feature="norm1", delta=None, masks="clustered", n_random_masks=None,
                  causal_score="debiased", pcb=True, sigma=0.1, score="auto", return_masks=False),
}
_START_LAYER = ("rollout", "chefer1", "chefer2", "tam", "bt_head", "bt_token")
_ONE_BLOCK = ("gradcam", "attention_cam", "raw_attention", "scorecam", "vitcx")


def _blocks(layers, num_blocks: int) -> Optional[list[int]]:
    try:
        return take_indices(layers, num_blocks)
    except (InputError, TypeError, ValueError):
        return None


def _one_block(method: str, layers, L: int, default_layer: int) -> list:
    """0.1 ``layer`` values that read the block the new ``layers`` of a one-block method picks."""
    if layers is None:
        if method == "vitcx":  # 0.1's None was the model's default block too
            return [None]
        if default_layer == L - 1:  # 0.1's default was the last block (gradcam: None meant -1)
            return ([None] if method == "gradcam" else []) + [-1, L - 1]
        return [default_layer, default_layer - L]
    if method == "vitcx" and isinstance(layers, (list, tuple)) and len(layers) == 1 \
            and isinstance(layers[0], (list, tuple)):  # Swin (stage, block): 0.1 took the pair itself
        return [list(layers[0])]
    sel = _blocks(layers, L)
    if sel is None or len(sel) != 1:
        return []
    return [sel[0], sel[0] - L]


def _dedupe(cands: list[dict]) -> list[dict]:
    out, seen = [], set()
    for c in cands:
        k = key_of(c)
        if k not in seen:
            seen.add(k)
            out.append(c)
    return out


def legacy_param_candidates(method: str, new_full_params: dict, num_blocks: int,
                            default_layer: Optional[int] = None) -> list[dict]:
    """The full parameter dicts vitlens 0.1 would have used for the maps ``method`` computes with
    ``new_full_params`` on a model of ``num_blocks`` blocks (``default_layer``: the model's
    ``default_feature_layer``, default the last block); ``[]`` when there are none (the method was not
    renamed, or the parameters have no 0.1 equivalent)."""
    if method not in V01_PARAMS:
        return []
    L = int(num_blocks)
    d = L - 1 if default_layer is None else int(default_layer) % L
    p = dict(new_full_params)
    layers = p.pop("layers", None)
    if method in _START_LAYER:  # start_layer = s selected blocks s .. L-1
        sel = _blocks(layers, L)
        cands = [dict(p, start_layer=sel[0])] if sel and sel == list(range(sel[0], L)) else []
    elif method == "textspan":  # n_layers = n: the last n blocks (None: all of them)
        sel = _blocks(layers, L)
        ok = bool(sel) and sel == list(range(L - len(sel), L))
        cands = [dict(p, n_layers=n) for n in ([len(sel)] + ([None] if len(sel) == L else []))] if ok else []
    elif method == "legrad":  # named selections, now numbers
        if layers is None:
            olds = ["all"]
        elif isinstance(layers, float) and layers == 0.4:
            olds = ["paper", None, 0.4]
        elif isinstance(layers, int) and not isinstance(layers, bool) and layers == 2:
            olds = ["released", 2]
        else:
            olds = [layers]
        cands = [dict(p, layers=v) for v in olds]
    else:  # one-block methods: layer (and ViT-CX's feature = site, Grad-CAM's site None = "input")
        site = p.pop("site", None)
        sites = [site] if method != "gradcam" else ([None, "input"] if site == "input" else [site])
        site_name = "feature" if method == "vitcx" else "site"
        cands = []
        for v in _one_block(method, layers, L, d):
            for s in sites:
                c = dict(p, layer=v)
                if method in ("gradcam", "scorecam", "vitcx"):
                    c[site_name] = s
                cands.append(c)
    names = set(V01_PARAMS[method])
    return _dedupe([c for c in cands if set(c) == names])  # a parameter 0.1 did not have: no equivalent


def _say(msg: str, log: logging.Logger, show: bool, level: int = logging.INFO) -> None:
    log.log(level, msg)
    if show:
        print(f"vitlens bench: {msg}", file=sys.stderr, flush=True)


def _old_style(method: str, params: dict) -> bool:
    """Whether stored parameters are in 0.1's vocabulary."""
    old = V01_PARAMS.get(method)
    if old is None or set(params) != set(old):
        return False
    return method != "legrad" or isinstance(params.get("layers"), str)


def rekey_legacy_runs(store: Store, cfg, plan, model, log: logging.Logger) -> int:
    """Rename the 0.1 runs of the folder that computed the maps of ``plan``'s method entries to the
    entries' current run keys (see the module docstring); returns the number of runs renamed. Call it
    before the plan is recorded in the store."""
    show = cfg.progress is not False
    renamed = 0
    for spec in cfg.methods:
        label, key = spec.label, plan.run_keys[spec.label]
        if spec.method not in V01_PARAMS:
            continue
        cands = legacy_param_candidates(spec.method, plan.full_params[label], model.num_blocks,
                                        getattr(model, "default_feature_layer", None))
        found = False
        for old in cands:
            old_key = key_of({**plan.keys[label], "params": old})
            if old_key == key or not store.has_run(old_key):
                continue
            n = store.rename_run(old_key, key, plan.full_params[label], label=label)
            found = True
            renamed += 1
            shown = ", ".join(f"{k}={old[k]!r}" for k in sorted(old) if k not in plan.full_params[label]
                              or plan.full_params[label][k] != old[k])
            _say(f"'{label}': resuming the vitlens 0.1 run {old_key} ({shown or 'same parameters'}): "
                 f"{n} maps and their rows now under run key {key}.", log, show)
        if found or store.has_run(key):
            continue
        olds = [k for k, p in store.runs_of(spec.method).items() if _old_style(spec.method, p)]
        if olds:
            why = ("these parameters have no vitlens 0.1 equivalent" if not cands else
                   "none of them was run with these parameters")
            _say(f"'{label}': the folder holds {len(olds)} vitlens 0.1 run(s) of {spec.method} ({', '.join(olds)}) "
                 f"but {why} ({spec.method} with {plan.full_params[label]}); computing its maps anew.",
                 log, show, logging.WARNING)
    return renamed
