"""Insertion / deletion / perturbation against slow step-by-step loops written from the definitions."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import vitlens
from vitlens.errors import InputError
from vitlens.metrics import deletion, get_metric, insertion, perturbation
from vitlens.metrics.causal import rise_kernel_1d

from conftest import IMG, TINY_FACTORIES

FAMILIES = ["timm_vit", "torchvision"]


def _rise_gkern(klen=11, nsig=5.0):
    """RISE's gkern, written from its description: scipy's gaussian_filter of a centred impulse."""
    from scipy.ndimage import gaussian_filter

    inp = np.zeros((klen, klen))
    inp[klen // 2, klen // 2] = 1
    return torch.from_numpy(gaussian_filter(inp, nsig)).float()


def _trapz(y, x):
    y, x = np.asarray(y, dtype=np.float64), np.asarray(x, dtype=np.float64)
    return float(((y[1:] + y[:-1]) / 2 * np.diff(x)).sum())


def _order(m):
    """Pixels by decreasing saliency, ties -> lower flat index first (plain Python sort)."""
    vals = m.reshape(-1).tolist()
    return sorted(range(len(vals)), key=lambda i: (-vals[i], i))


def _substrate(a, x, kind):
    mean = torch.tensor(a.mean).view(1, 3, 1, 1)
    std = torch.tensor(a.std).view(1, 3, 1, 1)
    if kind == "blur":
        k = _rise_gkern()
        w = torch.zeros(3, 3, 11, 11)
        for c in range(3):
            w[c, c] = k
        return F.conv2d(x, w, padding=5)
    if kind == "black":
        return (torch.zeros_like(x) - mean) / std
    if kind == "mean":
        return x.mean((2, 3), keepdim=True).expand_as(x)
    if kind == "zero":
        return torch.zeros_like(x)
    raise ValueError(kind)


def _slow_curve(a, x, m, target, mode, kind, n_steps, start_point=True):
    """RISE's single_run: explicit loop over steps, one forward pass per step."""
    HW = x.shape[-1] * x.shape[-2]
    step = (HW + n_steps - 1) // n_steps
    sub = _substrate(a, x[None], kind)[0]
    cur, fin = (x.clone(), sub) if mode == "deletion" else (sub.clone(), x.clone())
    order = _order(m)
    scores = []
    for i in range(n_steps + 1):
        if start_point or i > 0:
            with torch.no_grad():
                p = a.forward(cur[None]).softmax(-1)[0, target]
            scores.append(float(p))
        coords = torch.tensor(order[step * i: step * (i + 1)], dtype=torch.long)
        if len(coords):
            cur.view(3, -1)[:, coords] = fin.reshape(3, -1)[:, coords]
    return torch.tensor(scores)


def test_blur_kernel_is_rises():
    k1 = rise_kernel_1d(11, 5.0).float()
    torch.testing.assert_close(k1[:, None] * k1[None, :], _rise_gkern(), atol=1e-7, rtol=1e-6)
    assert abs(float(k1.sum()) - 1) < 1e-12


@pytest.mark.parametrize("family,mode,kind,protocol", [
    ("timm_vit", "deletion", "blur", "paper"), ("timm_vit", "insertion", "blur", "paper"),
    ("timm_vit", "deletion", "black", "paper"), ("timm_vit", "insertion", "mean", "paper"),
    ("timm_vit", "deletion", None, "rise_code"),
    ("torchvision", "deletion", "blur", "paper"), ("torchvision", "insertion", "mean", "paper"),
])
def test_matches_step_loop(family, mode, kind, protocol):
    a = vitlens.wrap_model(TINY_FACTORIES[family]())
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, IMG, IMG, generator=g)
    maps = torch.rand(2, IMG, IMG, generator=g)
    maps[0, :8] = 0.5  # a block of ties
    targets = [3, 7]
    n = 8
    fn = insertion if mode == "insertion" else deletion
    res = fn(a, x, maps, targets, protocol=protocol, substrate=kind, n_steps=n, batch_size=5)
    sub = res.protocol["substrate"]
    start = protocol != "tis_code"
    for b in range(2):
        ref = _slow_curve(a, x[b], maps[b], targets[b], mode, sub, n, start)
        # probabilities (<= 1) from batched vs single float32 forwards: rounding ~1e-7, bound 1e-5
        torch.testing.assert_close(res.curves[b], ref, atol=1e-5, rtol=1e-5)
        xs = np.arange(0 if start else 1, n + 1) / n
        assert abs(float(res.values[b]) - _trapz(ref.numpy(), xs)) < 2e-5  # a mean of the curve: same bound
    if start:  # RISE's normalised AUC formula
        ref_auc = (res.curves.sum(1) - res.curves[:, 0] / 2 - res.curves[:, -1] / 2) / n
        torch.testing.assert_close(res.values, ref_auc, atol=1e-6, rtol=1e-5)  # same curve values, sums of 9


def test_rise_code_protocol_substrates(tiny_vit, images):
    maps = torch.rand(2, IMG, IMG)
    d = deletion(tiny_vit, images, maps, n_steps=4, protocol="rise_code")
    i = insertion(tiny_vit, images, maps, n_steps=4, protocol="rise_code")
    assert d.protocol["substrate"] == "zero" and i.protocol["substrate"] == "blur"
    assert d.curves.shape == (2, 5) and torch.allclose(d.xs, torch.linspace(0, 1, 5))


def test_end_points_and_batching(tiny_vit, images):
    """x=0 of deletion and x=1 of insertion are the clean image; batch size changes nothing."""
    maps = torch.rand(2, IMG, IMG)
    with torch.no_grad():
        p = tiny_vit.forward(images).softmax(-1)
    t = p.argmax(-1)
    clean = p.gather(1, t[:, None])[:, 0]
    d = deletion(tiny_vit, images, maps, None, n_steps=8, substrate="black")
    i = insertion(tiny_vit, images, maps, None, n_steps=8, substrate="black", batch_size=1)
    # probabilities (<= 1) from forwards of other batch shapes: float32 rounding ~1e-7, bound 1e-5
    torch.testing.assert_close(d.curves[:, 0], clean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(i.curves[:, -1], clean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(d.curves[:, -1], i.curves[:, 0], atol=1e-5, rtol=1e-5)  # both the all-black image
    d1 = deletion(tiny_vit, images, maps, None, n_steps=8, substrate="black", batch_size=3)
    torch.testing.assert_close(d.curves, d1.curves, atol=1e-5, rtol=1e-5)


def test_constant_and_zero_maps_use_raster_order(tiny_vit, images):
    """Ties (a constant or all-zero map) are broken in raster order, i.e. like a map decreasing along rows."""
    raster = -torch.arange(IMG * IMG, dtype=torch.float32).reshape(1, IMG, IMG).repeat(2, 1, 1)
    ref = deletion(tiny_vit, images, raster, [1, 2], n_steps=8)
    for m in (torch.zeros(2, IMG, IMG), torch.full((2, IMG, IMG), 0.3)):
        got = deletion(tiny_vit, images, m, [1, 2], n_steps=8)
        torch.testing.assert_close(got.curves, ref.curves, rtol=0, atol=0)  # same images, same batches: bit-identical


def test_random_substrate_is_seeded_pixel_noise(tiny_vit, images):
    maps = torch.rand(2, IMG, IMG)
    a = insertion(tiny_vit, images, maps, 0, n_steps=4, substrate="random", seed=1)
    b = insertion(tiny_vit, images, maps, 0, n_steps=4, substrate="random", seed=1)
    c = insertion(tiny_vit, images, maps, 0, n_steps=4, substrate="random", seed=2)
    torch.testing.assert_close(a.curves, b.curves, rtol=0, atol=0)  # same seed, same computation
    assert not torch.allclose(a.curves[:, 0], c.curves[:, 0])


def test_errors(tiny_vit, images):
    with pytest.raises(InputError, match="substrate"):
        insertion(tiny_vit, images, torch.rand(2, IMG, IMG), substrate="grey")
    with pytest.raises(InputError, match="protocol"):
        deletion(tiny_vit, images, torch.rand(2, IMG, IMG), protocol="nope")
    with pytest.raises(InputError, match="do not match"):
        deletion(tiny_vit, images, torch.rand(2, 4, 4))
    with pytest.raises(InputError, match="NaN"):
        deletion(tiny_vit, images, torch.full((2, IMG, IMG), float("nan")))


# ------------------------------------------------------------------------------------------ perturbation
def _slow_perturbation(a, x, m, target, negative):
    """Chefer et al.'s evaluation: zero the top int(p*HW) pixels in [0,1] space, renormalise, top-1."""
    mean = torch.tensor(a.mean).view(3, 1, 1)
    std = torch.tensor(a.std).view(3, 1, 1)
    pix = x * std + mean
    order = _order(-m if negative else m)
    out = []
    for p in [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]:
        d = pix.clone().reshape(3, -1)
        d[:, order[: int(p * m.numel())]] = 0
        with torch.no_grad():
            pred = a.forward(((d.reshape(pix.shape) - mean) / std)[None]).argmax(-1)
        out.append(float(pred[0] == target))
    return torch.tensor(out)


@pytest.mark.parametrize("family,order", [("timm_vit", "positive"), ("timm_vit", "negative"),
                                          ("torchvision", "negative")])
def test_perturbation_matches_loop(family, order):
    a = vitlens.wrap_model(TINY_FACTORIES[family]())
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, IMG, IMG, generator=g)
    maps = torch.rand(2, IMG, IMG, generator=g)
    with torch.no_grad():
        pred = a.forward(x).argmax(-1)
    res = perturbation(a, x, maps, None, order=order, batch_size=7)
    xs = np.arange(10) / 10
    for b in range(2):
        ref = _slow_perturbation(a, x[b], maps[b], int(pred[b]), order == "negative")
        assert ref[0] == 1.0
        torch.testing.assert_close(res.curves[b], ref, atol=1e-5, rtol=1e-5)  # ratios of probabilities, batched vs single
        assert abs(float(res.values[b]) - _trapz(ref.numpy(), xs)) < 2e-5
    info = get_metric(f"perturbation_{order}")
    assert info.higher_is_better == (order == "negative")
    torch.testing.assert_close(info.fn(a, x, maps, None).values, res.values, atol=1e-5, rtol=1e-5)  # other batch size


def test_registry_contract():
    import inspect

    from vitlens.errors import UnknownMethodError
    from vitlens.metrics import available_metrics

    names = available_metrics()
    for n in ["insertion", "deletion", "pointing_game", "perturbation_positive", "perturbation_negative",
              "max_sensitivity", "sparseness", "grid_pointing_game", "segmentation", "open_vocab"]:
        assert n in names
        info = get_metric(n)
        params = inspect.signature(info.fn).parameters
        assert list(params)[:4] == ["model", "x", "maps", "targets"]
        assert "batch_size" in params and "progress" in params
        assert all(k in params for k in info.defaults) and all(k in params for k in info.needs)
    assert get_metric("insertion").higher_is_better and not get_metric("deletion").higher_is_better
    with pytest.raises(UnknownMethodError, match="available"):
        get_metric("nope")
