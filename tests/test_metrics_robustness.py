"""Sparseness (Gini index) against its sum definition; max-sensitivity against Captum's sensitivity_max."""
from __future__ import annotations

import pytest
import torch

import vitlens
from vitlens.errors import InputError
from vitlens.metrics import max_sensitivity, sparseness

from conftest import IMG, TINY_FACTORIES


def _slow_gini(m):
    """Hurley & Rickard: 1 - 2 sum_k a_(k)/||a||_1 (N - k + 1/2)/N on the non-negative-shifted map."""
    a = [float(v) for v in m.reshape(-1)]
    lo = min(a)
    if lo < 0:
        a = [v - lo for v in a]
    a.sort()
    n, s = len(a), sum(a)
    if s == 0:
        return 0.0
    return 1 - 2 * sum(v / s * (n - k + 0.5) / n for k, v in enumerate(a, start=1))


def test_sparseness_matches_definition():
    g = torch.Generator().manual_seed(0)
    maps = torch.stack([torch.rand(12, 12, generator=g), torch.randn(12, 12, generator=g),
                        torch.rand(12, 12, generator=g) ** 6])
    got = sparseness(None, None, maps).values
    ref = torch.tensor([_slow_gini(m) for m in maps])
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-5)
    assert got[2] > got[0]  # a peakier map is sparser


def test_sparseness_degenerate():
    n = 144
    spike = torch.zeros(1, 12, 12)
    spike[0, 3, 4] = 5
    vals = sparseness(None, None, torch.cat([torch.zeros(1, 12, 12), torch.full((1, 12, 12), 0.4), spike,
                                             -spike])).values
    torch.testing.assert_close(vals[:3], torch.tensor([0.0, 0.0, 1 - 1 / n]))
    # a single negative pixel shifted up: every other pixel equal and positive, one zero
    torch.testing.assert_close(vals[3], torch.tensor(_slow_gini(-spike[0]), dtype=torch.float32))


def _saliency(a):
    """Input-gradient map |d logsumexp(logits) / dx| summed over channels (accepts Captum's tuples)."""
    def fn(inp):
        x = inp[0] if isinstance(inp, tuple) else inp
        with torch.enable_grad():
            x = x.detach().requires_grad_()
            a.forward(x).logsumexp(-1).sum().backward()
        m = x.grad.abs().sum(1)
        return (m,) if isinstance(inp, tuple) else m
    return fn


@pytest.mark.parametrize("family", ["timm_vit", "hf"])
def test_max_sensitivity_equals_captum(family):
    captum_sens = pytest.importorskip("captum.metrics").sensitivity_max
    a = vitlens.wrap_model(TINY_FACTORIES[family]())
    x = torch.randn(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(2))
    fn = _saliency(a)
    maps = fn(x)
    ref = []
    for i in range(2):  # Captum on a batch of one image (as TIS's evaluate.py calls it): the noise of our draw
        torch.manual_seed(7)
        ref.append(captum_sens(fn, (x[i:i + 1],), perturb_radius=0.02, n_perturb_samples=4))
    ref = torch.cat(ref)
    ours = max_sensitivity(a, x, maps, 0, explainer=fn, seed=7, n_samples=4, batch_size=3)
    # max ||phi(x+e) - phi(x)|| / ||phi(x)|| with |e| <= 0.02: the difference of two nearly equal maps amplifies
    # their float32 rounding (~1e-6 relative, other batch shapes than Captum's) by ~1/(relative change ~1e-2)
    torch.testing.assert_close(ours.values, ref.float(), atol=1e-6, rtol=1e-3)
    other = max_sensitivity(a, x, maps, 0, explainer=fn, seed=8, n_samples=4)
    assert not torch.allclose(other.values, ours.values)


def test_max_sensitivity_method_name(tiny_vit, images):
    params = dict(n_masks=8, max_iter=5)
    maps = vitlens.explain(tiny_vit, images, "tis", target=[1, 2], **params).maps
    via_name = max_sensitivity(tiny_vit, images, maps, [1, 2], method="tis", method_params=params, n_samples=2)
    calls = []

    def expl(x):
        calls.append(x.shape[0])
        return vitlens.explain(tiny_vit, x, "tis", target=[1, 1, 2, 2][: x.shape[0]], **params).maps
    via_fn = max_sensitivity(tiny_vit, images, maps, [1, 2], explainer=expl, n_samples=2)
    torch.testing.assert_close(via_name.values, via_fn.values)
    assert calls == [4] and (via_name.values > 0).all()


def test_max_sensitivity_errors(tiny_vit, images):
    with pytest.raises(InputError, match="explainer"):
        max_sensitivity(tiny_vit, images, torch.rand(2, IMG, IMG), 0)
