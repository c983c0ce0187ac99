"""The GPU path: every method and metric on CUDA against the CPU, host-device copies, memory.

Skipped (with the reason) when CUDA is absent. Run with ``pytest -m cuda``.

Tolerances:

* fp32: CUDA and CPU sum in different orders (float32, relative ~1e-6 per reduction, a few 1e-5
  through two blocks and a backward pass); explain's min-max normalisation divides by the map's range,
  so normalised maps agree to ``atol=2e-3``. TF32 is switched off for the comparison (convolutions
  default to TF32 on Ampere+, which would be a 1e-3 relative change of every patch embedding).
  Methods that make discrete choices on the clean activations (TIS's top-k of K-Means centroids,
  ViT-CX's clustering threshold) may flip a near-tie: they must agree to a map correlation of 0.999.
* bf16 (the CUDA default for perturbed forward passes): bf16 results of two devices differ by as much
  as bf16 differs from fp32, so the bound is the fidelity criterion of ``docs/precision.md``: map
  correlation >= 0.99 with the CPU fp32 map, metric AUCs within 0.02.
* ViT-CX draws its noise on the model's device (so CPU and CUDA noise differ by design): it is
  compared with ``sigma=0`` (the debiased score without noise), which is deterministic.
"""
from __future__ import annotations

import warnings

import pytest
import torch

import vitlens
from vitlens import precision as P
from vitlens.errors import UnsupportedModelError

from conftest import IMG, tiny_timm

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(),
                                 reason="needs a CUDA device (torch.cuda.is_available() is False)")]

LIGHT = {"tis": dict(n_masks=32), "rise": dict(n_masks=64), "integrated_gradients": dict(n_steps=8),
         "smoothgrad": dict(n_samples=4), "bt_head": dict(steps=4, layers=None),
         "bt_token": dict(steps=4, layers=None), "tam": dict(steps=4), "vitcx": dict(sigma=0.0)}
DISCRETE = ("tis", "vitcx")


@pytest.fixture(autouse=True)
def _no_tf32(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)


@pytest.fixture(scope="module")
def pair():
    """The same tiny ViT on the CPU and on CUDA (two modules, same weights), and inputs."""
    cpu = tiny_timm()
    gpu = tiny_timm().cuda()
    x = torch.randn(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(3))
    return vitlens.wrap_model(cpu), vitlens.wrap_model(gpu), x


def corr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    a, b = a - a.mean(), b - b.mean()
    return float((a @ b) / (a.norm() * b.norm()).clamp_min(1e-30))


def _explain_both(pair, method, precision=None):
    cpu, gpu, x = pair
    params = LIGHT.get(method, {})
    try:
        ref = vitlens.explain(cpu, x, method, precision="fp32", **params)
    except UnsupportedModelError as e:
        pytest.skip(f"{method} does not apply to a plain timm ViT: {e}")
    got = vitlens.explain(gpu, x.cuda(), method, precision=precision, **params)
    return ref, got


@pytest.mark.parametrize("method", vitlens.methods())
def test_every_method_fp32_on_cuda_matches_cpu(pair, method):
    ref, got = _explain_both(pair, method, precision="fp32")
    a, b = ref.maps, got.maps.cpu()
    assert torch.equal(ref.targets, got.targets)
    if method in DISCRETE:
        for i in range(a.shape[0]):
            assert corr(a[i], b[i]) >= 0.999
    else:
        torch.testing.assert_close(b, a, atol=2e-3, rtol=0)


@pytest.mark.parametrize("method", ["tis", "rise", "occlusion", "scorecam", "vitcx"])
def test_perturbation_methods_bf16_on_cuda_within_fidelity_bounds(pair, method):
    ref, got = _explain_both(pair, method, precision=None)  # None: the CUDA default
    assert P.resolve_precision(None, "cuda") == "bf16"
    for i in range(ref.maps.shape[0]):
        assert corr(ref.maps[i], got.maps[i].cpu()) >= 0.99


def _metric_cases(x):
    B, _, H, W = x.shape
    boxes = torch.zeros(B, H, W, dtype=torch.bool)
    boxes[:, H // 4: H // 2, W // 4: W // 2] = True
    return [("insertion", dict(n_steps=8)), ("deletion", dict(n_steps=8)), ("perturbation_positive", {}),
            ("perturbation_negative", {}), ("pointing_game", dict(boxes=boxes)), ("sparseness", {}),
            ("max_sensitivity", dict(method="gradcam", n_samples=2))]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_every_metric_on_cuda_matches_cpu(pair, precision):
    from vitlens.metrics import get_metric

    cpu, gpu, x = pair
    maps = torch.rand(x.shape[0], IMG, IMG, generator=torch.Generator().manual_seed(0))
    for name, kw in _metric_cases(x):
        fn = get_metric(name).fn
        kw_gpu = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
        extra = {"precision": precision} if "precision" in fn.__code__.co_varnames else {}
        ref = fn(cpu, x, maps, **kw).values.float()
        got = fn(gpu, x.cuda(), maps.cuda(), **kw_gpu, **extra).values.float().cpu()
        tol = 1e-4 if precision == "fp32" else 0.02  # AUCs of probabilities (float32 sums / bf16 fidelity)
        torch.testing.assert_close(got, ref, atol=tol, rtol=0, equal_nan=True, msg=lambda m: f"{name}: {m}")


def _memcpys(fn) -> int:
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(e.count for e in prof.key_averages() if e.key.startswith("Memcpy DtoH"))


@pytest.mark.parametrize("method", ["tis", "rise", "occlusion", "scorecam", "vitcx"])
def test_no_device_to_host_copies_inside_the_mask_loops(pair, method):
    """The number of device-to-host copies (profiler ``Memcpy DtoH`` events) does not grow with the
    number of batches: none happen inside the mask loop."""
    _, gpu, x = pair
    xg = x.cuda()
    params = LIGHT.get(method, {})
    run = lambda bs: vitlens.explain(gpu, xg, method, batch_size=bs, **params)  # noqa: E731
    run(64)  # warm-up (lazy CUDA init copies)
    assert _memcpys(lambda: run(3)) == _memcpys(lambda: run(64))


def test_batch_size_follows_free_memory_and_precision(pair, monkeypatch):
    from vitlens.batching import resolve_batch_size

    _, gpu, _ = pair
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (2 ** 30, 2 ** 34))
    tokens = 17
    per_input = tokens * (192 * 12 + gpu.num_heads * tokens * 2)
    with P.runtime("fp32"):
        assert resolve_batch_size(None, gpu, tokens, 10 ** 9) == int(2 ** 30 * 0.5 / 4 // per_input)
    with P.runtime("bf16"):
        assert resolve_batch_size(None, gpu, tokens, 10 ** 9) == int(2 ** 30 * 0.5 / 2 // per_input)


def test_cuda_oom_halves_and_retries(pair, monkeypatch):
    _, gpu, x = pair
    a = vitlens.wrap_model(gpu.module)
    xg = x.cuda()
    ref = vitlens.explain(a, xg, "rise", n_masks=16, batch_size=32, normalise=False, precision="fp32").maps
    orig = a.forward

    def forward(t, *args, **kw):
        if t.shape[0] > 6:
            raise torch.OutOfMemoryError("CUDA out of memory (fake)")
        return orig(t, *args, **kw)

    monkeypatch.setattr(a, "forward", forward)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        got = vitlens.explain(a, xg, "rise", n_masks=16, batch_size=32, normalise=False, precision="fp32").maps
    assert any("out of memory" in str(m.message) for m in w)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
