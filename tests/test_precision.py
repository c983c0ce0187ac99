"""Reduced precision, compiled forwards and out-of-memory halving (vitlens.precision) on the CPU.

Plumbing is checked with forward hooks on a linear layer (which dtype did each forward pass compute
in) and with a wrapper around ``adapter.score`` (the scores, softmax and accumulations must see
float32). The bf16 maps are compared with the fp32 maps through a bound that holds by construction
(a TIS map is a convex combination of its mask scores). Compilation is exercised through a fake
``torch.compile`` (fallback and padding) and one real dynamo trace with the cheap ``"eager"`` backend.
"""
from __future__ import annotations

import warnings

import pytest
import torch

import vitlens
from vitlens import precision as P
from vitlens.errors import InputError
from vitlens.metrics import deletion, insertion, perturbation_positive

from conftest import IMG, tiny_timm


@pytest.fixture(scope="module")
def model():
    # narrower than conftest's tiny ViT (24 channels): Score-CAM / ViT-CX run one pass per channel
    return vitlens.wrap_model(tiny_timm(embed_dim=24, num_heads=2))


@pytest.fixture(scope="module")
def x():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 3, IMG, IMG, generator=g)


@pytest.fixture(autouse=True)
def _fresh_warnings():
    P._WARNED.clear()
    yield


def fresh(model):
    """The same weights in a new adapter (no compiled paths / static batch sizes left from other tests)."""
    return vitlens.wrap_model(model.module)


class DtypeLog:
    """Records the output dtype of one linear layer and the dtype of every tensor ``adapter.score`` gets."""

    def __init__(self, adapter, monkeypatch):
        self.linear, self.scored = [], []
        self.handle = adapter.module.blocks[0].mlp.fc1.register_forward_hook(
            lambda m, i, o: self.linear.append(o.dtype))
        orig = adapter.score

        def score(outputs, target, kind="auto"):
            self.scored.append(outputs.dtype)
            return orig(outputs, target, kind)

        monkeypatch.setattr(adapter, "score", score)

    def close(self):
        self.handle.remove()


def test_check_precision_names_and_errors(model):
    assert P.check_precision("bfloat16") == "bf16" and P.check_precision(torch.float16) == "fp16"
    assert P.check_precision(None) is None and P.check_precision("auto") is None
    assert P.resolve_precision(None, "cpu") == "fp32" and P.resolve_precision(None, "cuda") == P.CUDA_DEFAULT
    with pytest.raises(InputError, match="unknown precision 'fp8'"):
        P.check_precision("fp8")
    with pytest.raises(InputError, match="unknown precision"):
        vitlens.explain(model, torch.zeros(1, 3, IMG, IMG), "tis", n_masks=4, precision="int8")


@pytest.mark.parametrize("method,params", [("tis", dict(n_masks=12)), ("rise", dict(n_masks=24)),
                                           ("occlusion", {}), ("vitcx", {}), ("scorecam", {})])
def test_perturbed_passes_run_at_the_requested_precision(model, x, monkeypatch, method, params):
    a = fresh(model)
    log = DtypeLog(a, monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "no native bf16 on this CPU"
        exp = vitlens.explain(a, x, method, precision="bf16", batch_size=5, **params)
    log.close()
    # the clean pass (target, TIS activations, ViT-CX / Score-CAM features) is fp32, every perturbed pass bf16
    assert log.linear[0] == torch.float32
    assert len(log.linear) > 2 and set(log.linear[1:]) == {torch.bfloat16}
    assert set(log.scored) == {torch.float32}  # softmax / scores on float32 outputs
    assert exp.maps.dtype == torch.float32
    log = DtypeLog(a, monkeypatch)
    vitlens.explain(a, x, method, batch_size=5, **params)  # default on the CPU: fp32 everywhere
    log.close()
    assert set(log.linear) == {torch.float32}


def test_metrics_run_their_curves_at_the_requested_precision(model, x, monkeypatch):
    a = fresh(model)
    maps = torch.rand(2, IMG, IMG, generator=torch.Generator().manual_seed(0))
    for fn, kw in ((insertion, dict(n_steps=4)), (deletion, dict(n_steps=4)), (perturbation_positive, {})):
        log = DtypeLog(a, monkeypatch)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            res = fn(a, x, maps, precision="bf16", **kw)
        log.close()
        assert log.linear[0] == torch.float32  # the target's clean pass
        assert set(log.linear[1:]) == {torch.bfloat16}
        assert res.values.dtype == torch.float32 and torch.isfinite(res.values).all()


def test_gradient_methods_stay_fp32_unless_asked(model, x, monkeypatch):
    a = fresh(model)
    log = DtypeLog(a, monkeypatch)
    with P.runtime("bf16"):  # e.g. `bench --precision bf16`: applies to the perturbed passes only
        vitlens.explain(a, x, "legrad")
    assert set(log.linear) == {torch.float32}
    log.linear.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        vitlens.explain(a, x, "legrad", precision="bf16")  # asked explicitly: the whole method autocasts
    log.close()
    assert torch.bfloat16 in log.linear


def test_bf16_tis_map_is_a_convex_combination_of_bf16_scores(model, x):
    """TIS eq. (5) averages mask scores, so with the same masks (K-Means runs on the fp32 clean pass)
    |map_bf16 - map_fp32| <= max_j |w_j^bf16 - w_j^fp32| exactly (up to float32 rounding of the sums).
    The scores are probabilities; bf16 keeps 8 significant bits (unit roundoff 2^-8 = 0.004), and
    through two blocks of this 10-class model the probabilities move by well under 0.05 (we assert
    that as a sanity bound), while they must move at all (autocast really ran)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        lo = vitlens.explain(model, x, "tis", n_masks=16, precision="bf16", normalise=False, return_masks=True)
    hi = vitlens.explain(model, x, "tis", n_masks=16, normalise=False, return_masks=True)
    assert torch.equal(lo.extras["keep"], hi.extras["keep"])
    dw = (lo.extras["mask_scores"] - hi.extras["mask_scores"]).abs()
    assert 0 < dw.max() < 0.05
    dmap = (lo.token_maps - hi.token_maps).abs().amax(dim=(1, 2))
    assert (dmap <= dw.amax(1) + 1e-6).all()


# ------------------------------------------------------------------------------------------ compile
def test_compile_falls_back_with_a_warning_when_torch_compile_raises(model, x, monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(torch, "compile", broken)
    a = fresh(model)
    ref = vitlens.explain(a, x, "tis", n_masks=8).maps
    with pytest.warns(RuntimeWarning, match="torch.compile failed.*no compiler here"):
        got = vitlens.explain(a, x, "tis", n_masks=8, compile=True).maps
    assert torch.equal(got, ref)  # the eager path, bit for bit


def test_compile_falls_back_when_the_compiled_call_fails(model, x, monkeypatch):
    def lazy_failure(fn, **kw):
        def call(*a):
            raise RuntimeError("inductor: C++ compile error")
        return call

    monkeypatch.setattr(torch, "compile", lazy_failure)
    a = fresh(model)
    maps = torch.rand(2, IMG, IMG, generator=torch.Generator().manual_seed(0))
    ref = insertion(a, x, maps, n_steps=4).values
    with pytest.warns(RuntimeWarning, match="C\\+\\+ compile error"):
        got = insertion(a, x, maps, n_steps=4, compile=True).values
    assert torch.equal(got, ref)


def test_compiled_paths_see_one_static_batch_size(model, x, monkeypatch):
    """The last, smaller batch is padded to the compiled batch size (one shape, one compilation) and the
    padding's outputs are dropped: the map equals the eager one up to float32 summation order
    (matrix products of different batch sizes may block differently: 1e-5 relative)."""
    shapes = []

    def recording(fn, **kw):
        assert kw.get("dynamic") is False
        def call(t):
            shapes.append(tuple(t.shape))
            return fn(t)
        return call

    monkeypatch.setattr(torch, "compile", recording)
    a = fresh(model)
    ref = vitlens.explain(a, x, "tis", n_masks=10, batch_size=6, normalise=False).token_maps
    got = vitlens.explain(a, x, "tis", n_masks=10, batch_size=6, compile=True, normalise=False).token_maps
    assert len(shapes) == 4 and len({s[0] for s in shapes}) == 1  # 20 subsets in batches 6, 6, 6, 2 -> all 6
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def test_real_dynamo_trace_of_the_adapter_paths(model, x, monkeypatch):
    """A real ``torch.compile`` (dynamo graph capture) of both paths, with the cheap ``eager`` backend so
    the test needs no C++ compiler; results equal the eager model up to float32 rounding."""
    a = fresh(model)
    monkeypatch.setattr(a, "COMPILE_OPTIONS", {"dynamic": False, "backend": "eager"})
    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fallback would be a failure here
        got = vitlens.explain(a, x, "rise", n_masks=8, batch_size=8, compile=True, normalise=False).maps
        got_t = vitlens.explain(a, x, "tis", n_masks=8, batch_size=8, compile=True, normalise=False).token_maps
    ref = vitlens.explain(a, x, "rise", n_masks=8, batch_size=8, normalise=False).maps
    ref_t = vitlens.explain(a, x, "tis", n_masks=8, batch_size=8, normalise=False).token_maps
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_t, ref_t, rtol=1e-5, atol=1e-6)
    assert set(a._compile_batch) == {"forward", "encode"}


# ------------------------------------------------------------------------------------- out of memory
def fake_oom(monkeypatch, adapter, attr: str, limit: int):
    """Make ``adapter.<attr>`` raise torch.OutOfMemoryError for batches larger than ``limit``."""
    calls = []
    orig = getattr(adapter, attr)

    def fn(t, *a, **k):
        calls.append(t.shape[0])
        if t.shape[0] > limit:
            raise torch.OutOfMemoryError("CUDA out of memory (fake)")
        return orig(t, *a, **k)

    monkeypatch.setattr(adapter, attr, fn)
    return calls


def test_oom_halves_the_batch_retries_and_remembers(model, x, monkeypatch):
    a = fresh(model)
    ref = vitlens.explain(a, x, "tis", n_masks=16, batch_size=16, normalise=False).token_maps
    calls = fake_oom(monkeypatch, a, "encode_tokens", 5)
    with pytest.warns(RuntimeWarning, match="out of memory with a batch of 16; retrying in batches of 8"):
        got = vitlens.explain(a, x, "tis", n_masks=16, batch_size=16, normalise=False).token_maps
    # 32 subsets: batch 16 fails, its halves of 8 fail, quarters of 4 run; the rest is pre-split to the
    # remembered cap of 4 (no second failure)
    assert max(c for c in calls if c <= 5) == 4 and sum(c for c in calls if c <= 5) == 32
    assert calls[:3] == [16, 8, 4]
    assert calls.count(16) == 1
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def test_oom_on_a_single_input_is_a_clear_error(model, x, monkeypatch):
    a = fresh(model)
    fake_oom(monkeypatch, a, "forward", 0)
    with pytest.raises(P.OutOfMemory, match="single input"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        P.perturbed_forward(a, x)


# ------------------------------------------------------------------------ no device syncs in the loops
def _scalar_reads(fn) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key == "aten::_local_scalar_dense")


@pytest.mark.parametrize("method,params", [("tis", dict(n_masks=16)), ("rise", dict(n_masks=16)),
                                           ("occlusion", {}), ("vitcx", {}), ("scorecam", {})])
def test_no_tensor_reads_inside_the_mask_loop(model, x, method, params):
    """``.item()`` / ``bool(t)`` / ``int(t)`` (a device-to-host synchronisation on CUDA) are
    ``aten::_local_scalar_dense`` calls; their number must not grow with the number of batches."""
    few = _scalar_reads(lambda: vitlens.explain(model, x, method, batch_size=64, **params))
    many = _scalar_reads(lambda: vitlens.explain(model, x, method, batch_size=3, **params))
    assert many == few


def test_no_tensor_reads_inside_the_metric_loops(model, x):
    maps = torch.rand(2, IMG, IMG, generator=torch.Generator().manual_seed(0))
    for fn in (lambda bs: insertion(model, x, maps, n_steps=8, batch_size=bs),
               lambda bs: perturbation_positive(model, x, maps, batch_size=bs)):
        assert _scalar_reads(lambda: fn(64)) == _scalar_reads(lambda: fn(3))


def test_bench_config_takes_precision_and_compile():
    from vitlens.bench.config import BenchConfig

    cfg = BenchConfig(methods="tis", metrics="insertion", precision="bfloat16", compile=True).normalise()
    assert cfg.precision == "bf16" and cfg.compile is True
    assert BenchConfig(methods="tis", metrics="insertion").normalise().precision is None  # device default
    with pytest.raises(InputError, match="unknown precision 'int8'"):
        BenchConfig(methods="tis", metrics="insertion", precision="int8").normalise()
