"""Contract tests generated from the registries: every registered method on the tiny model of every family
(``tests/tiny_models.py``), and every registered metric, checked for what any explainer or metric of vitlens
promises, whatever its equations (those are checked against slow references in the method's own tests):

* it runs where the model has what it declares it needs (``needs=`` at registration), and refuses in one
  line (an :class:`~vitlens.errors.UnsupportedModelError` naming the method) where it does not; the few
  refusals that depend on more than the declared capabilities are listed in ``CONDITIONAL_REFUSALS`` with
  their reason, so that a new refusal fails this test;
* output shapes: ``maps`` (B, H, W), ``token_maps`` (B, gh, gw) for token-level methods; finite values;
* the same seed gives the same map, bit for bit (CPU);
* a batch of 2 gives the maps of two batches of 1: equal up to float32 summation order, i.e. within
  ``rtol = 1e-4`` of the map's scale (``conftest.close_to_scale``: float32 reductions through the tiny
  models err by ~1e-6 relative; a wrong batch mix-up moves values by their own size);
* the model is left as it was: no hook left on any module or parameter, ``state_dict`` bit-identical,
  no ``.grad`` created, ``requires_grad`` flags unchanged.

New methods and metrics are covered as soon as they register; only a method that needs settings to stay
cheap on a tiny model needs an entry in ``QUICK``.
"""
from __future__ import annotations

import pytest
import torch

import vitlens
from vitlens.errors import UnsupportedModelError, VitlensError
from vitlens.methods import get_method, method_names
from vitlens.metrics import available_metrics, get_metric

from tiny_models import ALL_FACTORIES, IMG, TEXT_FAMILIES, wrap_tiny

FAMILIES = sorted(ALL_FACTORIES)

#: settings that keep a method cheap on a 64 x 64, 2-block model (every other parameter at its default)
QUICK = {
    "tis": dict(n_masks=8, max_iter=5),
    "rise": dict(n_masks=16),
    "occlusion": dict(window=32),
    "integrated_gradients": dict(n_steps=4),
    "smoothgrad": dict(n_samples=3),
    "bt_head": dict(steps=3, layers=None),
    "bt_token": dict(steps=3, layers=None),
    "tam": dict(steps=3),
    "textspan": dict(layers=1),
}

#: (method, family) refusals beyond the declared capabilities, each with the reason the method gives
CONDITIONAL_REFUSALS = {
    **{(m, f): "relevance propagation needs fc1 -> act -> fc2 MLP modules and a LayerNorm/CLS-or-avg head"
       for m in ("chefer1", "partial_lrp", "lrp", "attnlrp") for f in ("timm_siglip_like", "open_clip_siglip",
                                                                        "hf_siglip")},
    ("textspan", "timm_avgpool"): "the embedding must be the normalised CLS token (CLS pooling)",
    ("textspan", "timm_deit_distilled"): "a distilled DeiT averages two token heads",
    ("textspan", "hf_deit_distilled"): "a distilled DeiT averages two token heads",
}


def _targets(family: str, n: int):
    if family in TEXT_FAMILIES:
        return ["a photo of a dog", "a photo of a red car"][:n]
    return [1, 2][:n]


def _images(n: int = 2) -> torch.Tensor:
    return torch.randn(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(1))[:n]


def _hooks(module: torch.nn.Module) -> int:
    n = 0
    for m in module.modules():
        for name in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
                     "_state_dict_hooks", "_load_state_dict_pre_hooks"):
            n += len(getattr(m, name, {}) or {})
    for p in module.parameters():
        n += len(getattr(p, "_backward_hooks", None) or {})
    return n


def _snapshot(module: torch.nn.Module) -> tuple:
    return ({k: v.detach().clone() for k, v in module.state_dict().items()}, _hooks(module),
            [p.requires_grad for p in module.parameters()])


def _assert_untouched(module: torch.nn.Module, before: tuple) -> None:
    state, hooks, flags = before
    now = module.state_dict()
    assert now.keys() == state.keys()
    for k, v in state.items():
        assert torch.equal(now[k], v), f"state_dict entry {k} changed"
    assert _hooks(module) == hooks, "a hook was left on the model"
    assert [p.requires_grad for p in module.parameters()] == flags
    assert all(p.grad is None for p in module.parameters()), "a .grad was left on a parameter"


_ADAPTERS: dict = {}


def _adapter(family: str):
    if family not in _ADAPTERS:
        _ADAPTERS[family] = wrap_tiny(family, ALL_FACTORIES[family]())
    return _ADAPTERS[family]


def _one_line(e: BaseException, name: str) -> None:
    msg = str(e)
    assert "\n" not in msg and name in msg, msg


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", method_names())
def test_method_contract(method: str, family: str) -> None:
    a = _adapter(family)
    info = get_method(method)
    params = QUICK.get(method, {})
    declared_ok = all(a.provides(c) for c in info.needs)
    x = _images()
    before = _snapshot(a.module)
    if not declared_ok:
        with pytest.raises(UnsupportedModelError) as e:
            vitlens.explain(a, x, method, target=_targets(family, 2), **params)
        _one_line(e.value, method)
        _assert_untouched(a.module, before)
        return
    try:
        exp = vitlens.explain(a, x, method, target=_targets(family, 2), seed=3, **params)
    except UnsupportedModelError as e:
        assert (method, family) in CONDITIONAL_REFUSALS, f"{method} refused {family}: {e}"
        _one_line(e, method)
        _assert_untouched(a.module, before)
        return
    assert (method, family) not in CONDITIONAL_REFUSALS, f"{method} ran on {family}: update CONDITIONAL_REFUSALS"
    _assert_untouched(a.module, before)
    B, H, W = 2, IMG, IMG
    assert exp.maps.shape == (B, H, W) and torch.isfinite(exp.maps).all()
    if info.token_level:
        assert exp.token_maps is not None and exp.token_maps.shape == (B, *a.grid_size(x))
        assert torch.isfinite(exp.token_maps).all()
    # same seed, same map (bit for bit); the raw maps, before any normalisation
    raw = vitlens.explain(a, x, method, target=_targets(family, 2), seed=3, normalise=False, **params)
    again = vitlens.explain(a, x, method, target=_targets(family, 2), seed=3, normalise=False, **params)
    key = "token_maps" if raw.token_maps is not None else "maps"
    assert torch.equal(getattr(raw, key), getattr(again, key))
    # a batch of 2 = two batches of 1
    singles = [vitlens.explain(a, x[i:i + 1], method, target=_targets(family, 2)[i:i + 1], seed=3, normalise=False,
                               **params) for i in range(2)]
    joined = torch.cat([getattr(s, key) for s in singles])
    both = getattr(raw, key)
    for i in range(2):  # per image: each map against its own scale
        if joined[i].abs().max() > 0:
            from conftest import close_to_scale

            close_to_scale(both[i], joined[i])
        else:
            assert both[i].abs().max() == 0
    assert raw.targets.tolist() == torch.cat([s.targets for s in singles]).tolist()
    _assert_untouched(a.module, before)


# ------------------------------------------------------------------------------------------------ metrics
METRIC_FAMILIES = ["timm_vit", "timm_avgpool", "timm_swin", "torchvision", "open_clip"]
#: settings that keep a metric cheap (every other protocol value at its default)
METRIC_QUICK = {"insertion": dict(n_steps=4, substrate="random"), "deletion": dict(n_steps=4, substrate="random"),
                "max_sensitivity": dict(method="occlusion", method_params=dict(window=32), n_samples=2)}
#: metrics that refuse free-text prompts of a CLIP model without a class vocabulary: insertion/deletion score
#: the softmax probability by default (undefined for one prompt), perturbation counts top-1 class hits
PROMPT_REFUSALS = {"insertion", "deletion", "perturbation_positive", "perturbation_negative"}


def _data(name: str, family: str, maps: torch.Tensor, rows: slice = slice(None)) -> dict:
    """Ground truth for the batch of 2 (``rows``: the part of it for a batch of one)."""
    B, H, W = maps.shape
    d = _data_full(name, family, H, W)
    return {k: v[rows] for k, v in d.items()}


def _data_full(name: str, family: str, H: int, W: int) -> dict:
    B = 2
    needs = get_metric(name).needs
    d: dict = {}
    if "boxes" in needs:
        box = torch.zeros(B, H, W, dtype=torch.bool)
        box[:, H // 4: 3 * H // 4, W // 4: W // 2] = True
        d["boxes"] = box
    if "cells" in needs:
        d["cells"] = torch.arange(B) % 4
    if "masks" in needs:
        m = torch.zeros(B, H, W, dtype=torch.bool)
        m[:, : H // 2] = True
        d["masks"] = m
    if "points" in needs:
        d["points"] = torch.tensor([[[H // 4, W // 4], [3 * H // 4, 3 * W // 4]]] * B)
        d["point_labels"] = torch.tensor([[1, 0]] * B)
    if "labels" in needs:
        d["labels"] = torch.tensor([1, 2])
    return d


@pytest.mark.parametrize("family", METRIC_FAMILIES)
@pytest.mark.parametrize("metric", available_metrics())
def test_metric_contract(metric: str, family: str) -> None:
    a = _adapter(family)
    info = get_metric(metric)
    x = _images()
    g = torch.Generator().manual_seed(5)
    maps = torch.rand(2, IMG, IMG, generator=g)
    tg = _targets(family, 2)
    kw = dict(METRIC_QUICK.get(metric, {}))
    before = _snapshot(a.module)
    if family in TEXT_FAMILIES and metric in PROMPT_REFUSALS:
        with pytest.raises(VitlensError) as e:
            info(a, x, maps, tg, **_data(metric, family, maps), **kw)
        assert "\n" not in str(e.value)
        _assert_untouched(a.module, before)
        return
    res = info(a, x, maps, tg, **_data(metric, family, maps), **kw)
    _assert_untouched(a.module, before)
    assert res.values.shape == (2,)
    lo, hi = info.range_for(res.protocol).lo, info.range_for(res.protocol).hi
    v = res.values[torch.isfinite(res.values)]
    assert torch.isnan(res.values[~torch.isfinite(res.values)]).all()  # excluded images are NaN, never inf
    if lo is not None:
        assert (v >= lo - 1e-6).all(), (metric, v)
    if hi is not None:
        assert (v <= hi + 1e-6).all(), (metric, v)
    if info.range_for(res.protocol).binary:
        assert torch.isin(v, torch.tensor([0.0, 1.0])).all()
    again = info(a, x, maps, tg, **_data(metric, family, maps), **kw)
    assert torch.equal(res.values, again.values, ) or torch.allclose(res.values, again.values, equal_nan=True, rtol=0,
                                                                       atol=0)
    singles = [info(a, x[i:i + 1], maps[i:i + 1], tg[i:i + 1], **_data(metric, family, maps, slice(i, i + 1)), **kw)
               for i in range(2)]
    joined = torch.cat([s.values for s in singles])
    scale = float(torch.nan_to_num(joined).abs().max()) or 1.0
    torch.testing.assert_close(res.values, joined, rtol=1e-4, atol=1e-4 * scale, equal_nan=True)
    _assert_untouched(a.module, before)


def test_every_registered_signature_is_typed() -> None:
    """The parameter converter reads the type hints: an unresolvable hint would silently accept anything."""
    from vitlens._params import type_hints

    for name in method_names():
        info = get_method(name)
        hints = type_hints(info.fn)
        assert hints, f"method {name}: type hints cannot be resolved"
        missing = [k for k in info.defaults if k not in hints]
        assert not missing, f"method {name}: parameters without a type hint: {missing}"
    for name in available_metrics():
        info = get_metric(name)
        hints = type_hints(info.fn)
        assert hints, f"metric {name}: type hints cannot be resolved"


def test_registering_a_name_twice_is_an_error() -> None:
    from vitlens.methods.base import register
    from vitlens.registry import RegistryError

    with pytest.raises(RegistryError, match="registered twice"):
        @register("rollout", kind="attention", token_level=True, description="a second rollout")
        def rollout(adapter, x, target=None, *, seed=0, batch_size=None, progress=None):  # noqa: ARG001
            raise AssertionError
    assert get_method("rollout").fn.__module__ == "vitlens.methods.rollout"
    with pytest.raises(RegistryError, match="auto_score"):
        @register("_bad_score", kind="gradient", token_level=True, description="score without a rule")
        def bad(adapter, x, target=None, *, seed=0, batch_size=None, progress=None, score="auto"):
            raise AssertionError
    with pytest.raises(RegistryError, match="kind"):
        @register("_bad_kind", kind="magic", token_level=True, description="no such kind")
        def bad2(adapter, x, target=None, *, seed=0, batch_size=None, progress=None):
            raise AssertionError
    assert "_bad_score" not in method_names() and "_bad_kind" not in method_names()
