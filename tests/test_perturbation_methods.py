"""RISE, occlusion, Score-CAM, Integrated Gradients and SmoothGrad against slow implementations of the
papers' equations written here: one image, one mask / window / channel / step / sample at a time,
forward passes through each library's own module (not the adapter), bilinear upsampling from its
formula."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import vitlens
from vitlens.errors import InputError, TargetError
from vitlens.methods.rise import rise_grids, rise_masks

from conftest import IMG, close_to_scale, tiny_hf, tiny_open_clip, tiny_timm, tiny_torchvision

PROMPT = "a photo of a dog"


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run far faster on one thread, especially on a loaded 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ----------------------------------------------------------------------------- slow references
def _torchvision_random_head():
    m = tiny_torchvision()
    torch.manual_seed(3)
    torch.nn.init.normal_(m.heads.head.weight, std=0.5)  # torchvision initialises the head to zero
    return m


FAMILIES = {
    "timm": lambda: tiny_timm("vit", embed_dim=32, num_heads=2),
    "hf": tiny_hf,
    "torchvision": _torchvision_random_head,
    "open_clip": tiny_open_clip,
}


def _setup(family):
    """(module, adapter, target for explain, slow score function f(module, images) -> (n,))."""
    m = FAMILIES[family]()
    a = vitlens.wrap_model(m)
    if family == "open_clip":
        txt = a.encode_text([PROMPT])[0]

        def f(inp):  # cosine similarity between image and prompt embeddings
            return F.normalize(m.encode_image(inp).float(), dim=-1) @ txt

        return m, a, PROMPT, f
    cls = 3

    def f(inp):  # softmax probability of class 3
        logits = m(inp).logits if family == "hf" else m(inp)
        return logits.float().softmax(-1)[:, cls]

    return m, a, cls, f


def _resize_matrix(n_in: int, n_out: int) -> np.ndarray:
    """R (n_out, n_in) of 1-D linear interpolation with half-pixel centres, edges clamped
    (src = (dst + 0.5) * n_in / n_out - 0.5)."""
    R = np.zeros((n_out, n_in))
    for i in range(n_out):
        u = max((i + 0.5) * n_in / n_out - 0.5, 0.0)
        i0 = min(int(math.floor(u)), n_in - 1)
        i1 = min(i0 + 1, n_in - 1)
        lam = u - i0
        R[i, i0] += 1 - lam
        R[i, i1] += lam
    return R


def _bilinear(a: np.ndarray, size) -> np.ndarray:
    return _resize_matrix(a.shape[0], size[0]) @ a @ _resize_matrix(a.shape[1], size[1]).T


def _images(n=2, seed=1):
    return torch.randn(n, 3, IMG, IMG, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- RISE
@pytest.mark.parametrize("family", ["timm", "hf", "open_clip"])
def test_rise_matches_equation_with_fixed_masks(family):
    m, a, target, f = _setup(family)
    x = _images()
    g = torch.Generator().manual_seed(5)
    masks = torch.rand(7, IMG, IMG, generator=g)
    p = 0.5
    ref = torch.zeros(2, IMG, IMG)
    with torch.no_grad():
        for b in range(2):
            for i in range(7):  # eq. (6): sum_i f(x . M_i) M_i / (N p)
                ref[b] += float(f((x[b] * masks[i])[None])[0]) * masks[i]
    ref /= 7 * p
    e = vitlens.explain(a, x, "rise", target=target, masks=masks, p=p, batch_size=3, normalise=False)
    close_to_scale(e.maps, ref, rtol=1e-4)  # batched vs single float32 forwards, sums of 7 terms


def test_rise_masks_match_paper_construction():
    """Grid -> bilinear upsampling to (s+1) cells of ceil(H/s) -> crop at the drawn offset."""
    s, p, size = 3, 0.5, (IMG, 48)
    grids, shifts = rise_grids(5, s, p, size, seed=11)
    got = rise_masks(5, s, p, size, seed=11)
    ch, cw = math.ceil(size[0] / s), math.ceil(size[1] / s)
    assert (shifts[:, 0] < ch).all() and (shifts[:, 1] < cw).all() and (shifts >= 0).all()
    for i in range(5):
        up = _bilinear(grids[i].double().numpy(), ((s + 1) * ch, (s + 1) * cw))
        dy, dx = int(shifts[i, 0]), int(shifts[i, 1])
        ref = up[dy:dy + size[0], dx:dx + size[1]]
        np.testing.assert_allclose(got[i].numpy(), ref, atol=1e-6)


def test_rise_grids_keep_probability_seed_and_cache():
    grids, _ = rise_grids(3000, 7, 0.3, (IMG, IMG), seed=2)
    assert abs(grids.float().mean().item() - 0.3) < 0.01
    again, _ = rise_grids(3000, 7, 0.3, (IMG, IMG), seed=2)
    assert again is grids  # cached, not regenerated
    other, _ = rise_grids(3000, 7, 0.3, (IMG, IMG), seed=3)
    assert not torch.equal(other, grids)


def test_rise_random_masks_equal_fixed_path_and_batch_invariant():
    _, a, target, _ = _setup("timm")
    x = _images()
    kw = dict(n_masks=20, s=4, p=0.5, seed=4, normalise=False, target=target)
    r1 = vitlens.explain(a, x, "rise", batch_size=7, **kw).maps
    r2 = vitlens.explain(a, x, "rise", batch_size=40, **kw).maps
    fixed = vitlens.explain(a, x, "rise", masks=rise_masks(20, 4, 0.5, (IMG, IMG), seed=4), **kw).maps
    # forward batches of 7 vs 40 masks: other GEMM shapes, not bit-identical
    close_to_scale(r1, r2, rtol=1e-5)
    close_to_scale(r1, fixed, rtol=1e-5)
    r3 = vitlens.explain(a, x, "rise", **{**kw, "seed": 5}).maps
    assert not torch.allclose(r1, r3)


def test_rise_bad_masks_raise():
    _, a, _, _ = _setup("timm")
    with pytest.raises(InputError, match="masks"):
        vitlens.explain(a, _images(), "rise", masks=torch.rand(3, 32, 32))
    with pytest.raises(InputError, match="keep probability"):
        vitlens.explain(a, _images(), "rise", n_masks=4, p=0.0)


# ----------------------------------------------------------------------------- occlusion
@pytest.mark.parametrize("family,window,stride", [("timm", None, None), ("torchvision", 24, 8),
                                                  ("open_clip", (16, 32), (16, 8))])
def test_occlusion_matches_equation(family, window, stride):
    m, a, target, f = _setup(family)
    x = _images()
    wh, ww = (16, 16) if window is None else ((window, window) if isinstance(window, int) else window)
    sh, sw = (wh, ww) if stride is None else ((stride, stride) if isinstance(stride, int) else stride)
    black = torch.tensor([-mu / sd for mu, sd in zip(a.mean, a.std)]).reshape(3, 1, 1)
    acc, cnt = torch.zeros(2, IMG, IMG), torch.zeros(IMG, IMG)
    with torch.no_grad():
        clean = f(x)
        for y0 in range(0, IMG - wh + 1, sh):
            for x0 in range(0, IMG - ww + 1, sw):
                occ = x.clone()
                occ[:, :, y0:y0 + wh, x0:x0 + ww] = black
                drop = clean - f(occ)
                acc[:, y0:y0 + wh, x0:x0 + ww] += drop[:, None, None]
                cnt[y0:y0 + wh, x0:x0 + ww] += 1
    ref = torch.where(cnt > 0, acc / cnt.clamp_min(1), torch.zeros_like(acc))
    e = vitlens.explain(a, x, "occlusion", target=target, window=window, stride=stride, baseline="black",
                        batch_size=5, normalise=False)
    close_to_scale(e.maps, ref, rtol=1e-4)  # differences of probabilities, batched vs single forwards


def test_occlusion_errors():
    _, a, _, _ = _setup("timm")
    with pytest.raises(InputError, match="larger than the image"):
        vitlens.explain(a, _images(), "occlusion", window=80)
    with pytest.raises(InputError, match="baseline"):
        vitlens.explain(a, _images(), "occlusion", baseline="grey")


# ----------------------------------------------------------------------------- Score-CAM
def _norm1_module(family, m):
    if family == "timm":
        return m.blocks[-1].norm1, 1
    if family == "hf":
        layers = m.vit.layers if hasattr(m.vit, "layers") else m.vit.encoder.layer  # transformers 5 / 4
        return layers[-1].layernorm_before, 1
    return m.visual.transformer.resblocks[-1].ln_1, 1


@pytest.mark.parametrize("family,weights", [("timm", "cic"), ("hf", "softmax"), ("open_clip", "cic")])
def test_scorecam_matches_equation(family, weights):
    m, a, target, f = _setup(family)
    x = _images(1)
    mod, P = _norm1_module(family, m)
    rec = []
    h = mod.register_forward_hook(lambda _m, _i, out: rec.append(out.detach()))
    with torch.no_grad():
        f(x)
    h.remove()
    acts = rec[0][0, P:]  # (N, D)
    gh = gw = IMG // 16
    D = acts.shape[1]
    scores = []
    with torch.no_grad():
        base = float(f(torch.zeros_like(x))[0])  # X_b: the fully masked image (x * 0)
        for k in range(D):
            up = _bilinear(acts[:, k].reshape(gh, gw).double().numpy(), (IMG, IMG))
            span = up.max() - up.min()
            hk = (up - up.min()) / span if span > 0 else np.zeros_like(up)
            scores.append(float(f(x * torch.tensor(hk, dtype=torch.float32))[0]))
    scores = torch.tensor(scores)
    alpha = scores - base if weights == "cic" else scores.softmax(0)
    ref = torch.relu((alpha[:, None] * acts.T.float()).sum(0)).reshape(gh, gw)
    e = vitlens.explain(a, x, "scorecam", target=target, weights=weights, batch_size=9, normalise=False)
    # sum_k alpha_k A_k cancels (softmax weights are all ~1/D): bound the rounding by the terms' magnitude
    terms = float((alpha[:, None].abs() * acts.T.float().abs()).sum(0).max())
    torch.testing.assert_close(e.token_maps[0], ref, rtol=1e-4, atol=1e-5 * terms)
    # weights are probabilities (or their differences), batched vs single forwards: rounding ~1e-7 absolute
    torch.testing.assert_close(e.extras["channel_weights"][0], alpha, atol=5e-6, rtol=1e-4)


def test_scorecam_errors():
    _, a, _, _ = _setup("timm")
    with pytest.raises(InputError, match="out of range"):
        vitlens.explain(a, _images(), "scorecam", layers=[5])
    with pytest.raises(InputError, match="site"):
        vitlens.explain(a, _images(), "scorecam", site="qkv")


# ----------------------------------------------------------------------------- Integrated Gradients
def _grad(f, inp):
    inp = inp.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(f(inp).sum(), inp)
    return g


def _reduce(attr, how):
    return {"abs_sum": attr.abs().sum(1), "sum": attr.sum(1), "max_abs": attr.abs().amax(1),
            "abs_of_sum": attr.sum(1).abs(), "l2": attr.norm(dim=1)}[how]


@pytest.mark.parametrize("family,ig_method,reduce", [("timm", "gausslegendre", "abs_sum"),
                                                     ("torchvision", "riemann_right", "sum"),
                                                     ("open_clip", "gausslegendre", "max_abs")])
def test_integrated_gradients_matches_equation(family, ig_method, reduce):
    m, a, target, f = _setup(family)
    x = _images()
    n = 8
    black = torch.tensor([-mu / sd for mu, sd in zip(a.mean, a.std)]).reshape(1, 3, 1, 1).expand_as(x)
    if ig_method == "riemann_right":  # eq. (3): alphas k/m, weights 1/m
        alphas, w = [k / n for k in range(1, n + 1)], [1 / n] * n
    else:  # Gauss-Legendre nodes and weights mapped from [-1, 1] to [0, 1]
        nodes, wts = np.polynomial.legendre.leggauss(n)
        alphas, w = list((nodes + 1) / 2), list(wts / 2)
    total = torch.zeros_like(x)
    for al, wk in zip(alphas, w):
        total += wk * _grad(f, black + float(al) * (x - black))
    attr = (x - black) * total
    e = vitlens.explain(a, x, "integrated_gradients", target=target, n_steps=n, ig_method=ig_method,
                        reduce=reduce, batch_size=6, normalise=False)
    close_to_scale(e.maps, _reduce(attr, reduce), rtol=1e-4)  # batched vs single backward passes


def test_integrated_gradients_completeness_from_black():
    """With the black baseline, sum of attributions ~ F(x) - F(black) (IG's completeness axiom)."""
    m, a, target, f = _setup("timm")
    x = _images()
    e = vitlens.explain(a, x, "integrated_gradients", target=target, n_steps=64, reduce="sum", normalise=False)
    black = torch.tensor([-mu / sd for mu, sd in zip(a.mean, a.std)]).reshape(1, 3, 1, 1).expand_as(x)
    with torch.no_grad():
        diff = f(x) - f(black)
    torch.testing.assert_close(e.maps.sum((1, 2)), diff, atol=2e-3, rtol=2e-2)


def test_gradient_methods_bad_reduce():
    _, a, _, _ = _setup("timm")
    with pytest.raises(InputError, match="parameter 'reduce' of method .* takes one of 'abs_sum'"):
        vitlens.explain(a, _images(), "integrated_gradients", reduce="mean", n_steps=2)


# ----------------------------------------------------------------------------- SmoothGrad
@pytest.mark.parametrize("family,average", [("timm", "grad"), ("hf", "abs_grad"), ("open_clip", "grad")])
def test_smoothgrad_matches_equation(family, average):
    m, a, target, f = _setup(family)
    x = _images()
    noise = torch.randn(5, 3, IMG, IMG, generator=torch.Generator().manual_seed(9))
    level = 0.2
    ref = torch.zeros_like(x)
    for b in range(2):
        sigma = level * float(x[b].max() - x[b].min())
        for i in range(5):  # eq. (2): mean of the gradients at x + N(0, sigma^2)
            g = _grad(f, (x[b] + sigma * noise[i])[None])[0]
            ref[b] += g.abs() if average == "abs_grad" else g
    ref /= 5
    e = vitlens.explain(a, x, "smoothgrad", target=target, noise=noise, noise_level=level, average=average,
                        batch_size=3, normalise=False)
    close_to_scale(e.maps, ref.abs().sum(1), rtol=1e-4)  # batched vs single backward passes


def test_smoothgrad_seeded():
    _, a, target, _ = _setup("timm")
    x = _images()
    r = [vitlens.explain(a, x, "smoothgrad", target=target, n_samples=4, seed=s, normalise=False).maps
         for s in (0, 0, 1)]
    torch.testing.assert_close(r[0], r[1], rtol=0, atol=0)  # same seed, same computation: bit-identical
    assert not torch.allclose(r[0], r[2])


# ----------------------------------------------------------------------------- every method, every family
@pytest.mark.parametrize("method,params", [("rise", dict(n_masks=6)), ("occlusion", dict(window=32)),
                                           ("scorecam", {}), ("integrated_gradients", dict(n_steps=2)),
                                           ("smoothgrad", dict(n_samples=2))])
def test_methods_run_on_every_family(tiny_family, method, params):
    name, a = tiny_family
    target = PROMPT if name == "open_clip" else 1
    x = _images()
    e = vitlens.explain(a, x, method, target=target, **params)
    assert e.maps.shape == (2, IMG, IMG) and torch.isfinite(e.maps).all()
    assert e.labels == [PROMPT] * 2 if name == "open_clip" else e.targets.tolist() == [1, 1]


def test_prob_on_text_prompt_is_an_error():
    _, a, _, _ = _setup("open_clip")
    with pytest.raises(TargetError, match="prob"):
        vitlens.explain(a, _images(), "occlusion", target=PROMPT, score="prob", window=32)


@pytest.mark.parametrize("method,params", [("rise", dict(n_masks=5)), ("occlusion", dict(window=32)),
                                           ("scorecam", {}), ("integrated_gradients", dict(n_steps=3)),
                                           ("smoothgrad", dict(n_samples=3))])
def test_per_image_targets_are_routed(method, params):
    """A batch with a different target per image equals explaining each image alone (the rows of the
    batched perturbations and of Captum's expanded steps are scored against their own image's target)."""
    _, a, _, _ = _setup("timm")
    x = _images()
    both = vitlens.explain(a, x, method, target=[3, 7], normalise=False, batch_size=4, **params).maps
    one = vitlens.explain(a, x[:1], method, target=3, normalise=False, **params).maps
    two = vitlens.explain(a, x[1:], method, target=7, normalise=False, **params).maps
    close_to_scale(both, torch.cat([one, two]), rtol=1e-4)  # batch of 2 images vs 1: other GEMM shapes
    swapped = vitlens.explain(a, x, method, target=[7, 3], normalise=False, batch_size=4, **params).maps
    assert (both - swapped).abs().max() > 1e-2 * both.abs().max()  # far beyond the tolerance above
