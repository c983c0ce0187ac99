"""ViT-CX (Xie et al., IJCAI 2023) against a slow implementation of the paper's equations written
here: features read with the libraries' own forward hooks, masks at pixel resolution, scikit-learn's
agglomerative clustering on the pixel masks, one forward pass per masked / noised image."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import vitlens
from vitlens.errors import InputError, TargetError
from vitlens.methods.vitcx import agglomerative_labels, mask_cosine_distances, normalised_grid_masks, upsample_maps

from conftest import IMG, close_to_scale, tiny_open_clip, tiny_timm, tiny_torchvision
from tiny_models import tiny_swin

PROMPT = "a photo of a cat"


@pytest.fixture(autouse=True)
def _one_thread():
    """Single-image forward passes of tiny models are slower with several threads on a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------------- slow reference
def _feature_module(name, module, site):
    """The library module whose output is the ViT-CX feature (the paper's attention-module output, or
    the authors' code's norm1), and the number of prefix tokens to drop."""
    if name.startswith("timm"):
        blk = module.blocks[-1]
        return (blk.norm1 if site == "norm1" else blk.ls1), module.num_prefix_tokens
    if name == "open_clip":
        blk = module.visual.transformer.resblocks[-1]
        return (blk.ln_1 if site == "norm1" else blk.ls_1), 1
    if name == "torchvision":
        blk = module.encoder.layers[-1]
        return (blk.ln_1 if site == "norm1" else blk.dropout), 1
    if name == "swin":
        blk = module.layers[-2].blocks[-1]
        return (blk.norm1 if site == "norm1" else blk.drop_path1), 0
    raise AssertionError(name)


def _features(name, module, x1, site):
    mod, n_prefix = _feature_module(name, module, site)
    got = []
    h = mod.register_forward_hook(lambda m, a, o: got.append(o))
    with torch.no_grad():
        _model_out(name, module, x1)
    h.remove()
    f = got[0][0]
    if name == "swin":  # (h, w, D)
        return f.permute(2, 0, 1)
    f = f[n_prefix:]
    g = int(round(f.shape[0] ** 0.5))
    return f.T.reshape(f.shape[1], g, g)


def _model_out(name, module, x):
    return module.encode_image(x) if name == "open_clip" else module(x)


def _f(name, module, x, target):
    """f(y | x): softmax probability of class ``target``, or cosine similarity with the prompt."""
    with torch.no_grad():
        out = _model_out(name, module, x)
        if isinstance(target, str):
            import open_clip

            txt = F.normalize(module.encode_text(open_clip.tokenize([target])).float(), dim=-1)[0]
            return float(F.normalize(out.float(), dim=-1)[0] @ txt)
        return float(out.float().softmax(-1)[0, target])


def _pixel_masks(feat, size):
    """Each channel upsampled bilinearly to ``size`` and min-max normalised (constant -> 0), float64."""
    m = F.interpolate(feat[None].double(), size=size, mode="bilinear", align_corners=False)[0]
    lo = m.amin(dim=(1, 2), keepdim=True)
    hi = m.amax(dim=(1, 2), keepdim=True)
    const = (hi - lo) <= 1e-12 * torch.maximum(hi.abs(), lo.abs())  # float64 rounding of a constant map
    return torch.where(const, torch.zeros_like(m), (m - lo) / (hi - lo).clamp_min(1e-300))


def _sklearn_labels(pixel_masks, delta):
    from sklearn.cluster import AgglomerativeClustering
    from threadpoolctl import threadpool_limits

    X = pixel_masks.reshape(pixel_masks.shape[0], -1).numpy()
    with threadpool_limits(1):  # BLAS threads thrash on a shared 2-core machine
        return AgglomerativeClustering(n_clusters=None, distance_threshold=delta, metric="cosine",
                                       linkage="complete").fit(X).labels_


def _same_partition(a, b) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return len(a) == len(b) and all((a == a[i]).tolist() == (b == b[i]).tolist() for i in range(len(a)))


def reference_vitcx(name, module, x, targets, *, site="norm1", delta=0.1, sigma=0.1, seed=0,
                    clustering=True, plain=False, pcb=True):
    """Paper equations, one image and one mask at a time; un-normalised saliency (B, H, W)."""
    H, W = x.shape[-2:]
    maps, all_labels = [], []
    for b in range(x.shape[0]):
        x1 = x[b:b + 1]
        masks = _pixel_masks(_features(name, module, x1, site), (H, W))  # (D, H, W) ViT masks
        D = masks.shape[0]
        labels = _sklearn_labels(masks, delta) if clustering else np.arange(D)
        all_labels.append(labels)
        # clusters ordered by their smallest member; mask = mean of members, min-max again
        order = sorted(set(labels.tolist()), key=lambda c: int(np.nonzero(labels == c)[0][0]))
        cm = [masks[torch.from_numpy(labels == c)].mean(0) for c in order]
        cm = torch.stack([(m - m.min()) / (m.max() - m.min()) if m.max() > m.min() else torch.zeros_like(m)
                          for m in cm]) if clustering else masks
        K = cm.shape[0]
        Z = sigma * torch.randn(K, 3, H, W, generator=torch.Generator().manual_seed(seed))
        f_x = _f(name, module, x1, targets[b])
        s = torch.zeros(K, dtype=torch.float64)
        for i in range(K):
            M = cm[i].float()
            if plain:
                s[i] = _f(name, module, x1 * M, targets[b])
            else:
                eps = (1 - M) * Z[i]
                s[i] = _f(name, module, x1 * M + eps, targets[b]) - _f(name, module, x1 + eps, targets[b]) + f_x
        num = (s[:, None, None] * cm).sum(0)
        if pcb:
            cov = cm.sum(0)
            sal = torch.where(cov > 0, num / cov.clamp_min(1e-300), torch.zeros_like(num))
        else:
            sal = num
        maps.append(sal)  # raw: compared with normalise=False (min-max would amplify rounding where the range is small)
    return torch.stack(maps).float(), all_labels


def _torchvision_random_head():
    m = tiny_torchvision()
    torch.nn.init.normal_(m.heads.head.weight, std=0.5)  # torchvision zero-initialises the head
    return m


FACTORIES = {
    # narrower than conftest's tiny ViT (D = 48 feature maps) to keep the one-mask-at-a-time reference fast
    "timm_vit": lambda: tiny_timm("vit", embed_dim=48),
    "timm_avgpool": lambda: tiny_timm("vit", embed_dim=48, class_token=False, global_pool="avg"),  # no CLS token
    "torchvision": _torchvision_random_head,
    "swin": tiny_swin,
}


def _images(n=2, seed=1):
    return torch.randn(n, 3, IMG, IMG, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------- exactness
@pytest.mark.parametrize("name,site,n_images,delta", [
    ("timm_vit", "attn_branch", 2, None),  # the paper text's site, delta 0.1 for ViT
    ("timm_avgpool", "norm1", 1, 0.2),
    ("torchvision", "attn_branch", 1, 0.2),
    ("swin", "norm1", 1, 0.15),
])
def test_matches_reference(name, site, n_images, delta):
    module = FACTORIES[name]()
    x = _images(n_images)
    a = vitlens.wrap_model(module)
    targets = [3, 7][:n_images]
    ref, ref_labels = reference_vitcx(name, module, x, targets, site=site, delta=0.1 if delta is None else delta)
    exp = vitlens.explain(a, x, method="vitcx", target=targets, site=site, return_masks=True, batch_size=16,
                          delta=delta, normalise=False)
    for got, want in zip(exp.extras["cluster_labels"], ref_labels):
        assert _same_partition(got, want)
    D = {"swin": 96, "torchvision": 32}.get(name, 48)
    assert 1 < exp.extras["n_masks"][0] < D  # clustering merged some masks, kept several
    # batched float32 forwards vs one at a time: the causal scores agree to ~1e-7; saliency is a mean of them
    close_to_scale(exp.maps, ref, rtol=1e-4)


def test_default_feature_is_authors_norm1():
    """The default feature site is the authors' code's ``blocks[-1].norm1`` (the LayerNorm output)."""
    module = tiny_timm("vit")
    x = _images(1)
    ref, _ = reference_vitcx("timm_vit", module, x, [3], site="norm1", delta=0.2)
    exp = vitlens.explain(module, x, method="vitcx", target=3, delta=0.2, normalise=False)
    assert exp.extras["site"] == "norm1"
    close_to_scale(exp.maps, ref, rtol=1e-4)  # see test_matches_reference


def test_default_delta():
    x = _images(1)
    one = dict(method="vitcx", target=0, masks="random", n_random_masks=1)
    assert vitlens.explain(tiny_swin(), x, **one).extras["delta"] == 0.05
    assert vitlens.explain(tiny_timm("vit"), x, **one).extras["delta"] == 0.1


def test_text_prompt_matches_reference():
    module = tiny_open_clip()
    x = _images(1)
    ref, _ = reference_vitcx("open_clip", module, x, [PROMPT], delta=0.2)
    exp = vitlens.explain(module, x, method="vitcx", target=PROMPT, delta=0.2, normalise=False)
    assert exp.extras["score"] == "similarity" and exp.labels == [PROMPT]
    close_to_scale(exp.maps, ref, rtol=1e-4)  # cosine similarities (|.| <= 1) from float32 forwards


@pytest.mark.parametrize("switches,ref_kw", [
    (dict(masks="all"), dict(clustering=False)),
    (dict(causal_score="plain"), dict(plain=True)),
    (dict(pcb=False, sigma=0.3, seed=5), dict(pcb=False, sigma=0.3, seed=5)),
])
def test_ablations_match_reference(switches, ref_kw):
    module = _torchvision_random_head()
    x = _images(1)
    ref, _ = reference_vitcx("torchvision", module, x, [2], delta=0.3, **ref_kw)
    exp = vitlens.explain(module, x, method="vitcx", target=2, delta=0.3, normalise=False, **switches)
    close_to_scale(exp.maps, ref, rtol=1e-4)  # see test_matches_reference


def test_random_masks_ablation():
    module = tiny_timm("vit")
    x = _images(1)
    a = vitlens.wrap_model(module)
    clustered = vitlens.explain(a, x, method="vitcx", target=1, return_masks=True)
    rnd = vitlens.explain(a, x, method="vitcx", target=1, masks="random", return_masks=True)
    fixed = vitlens.explain(a, x, method="vitcx", target=1, masks="random", n_random_masks=5, return_masks=True)
    assert rnd.extras["n_masks"] == clustered.extras["n_masks"] and fixed.extras["n_masks"] == [5]
    u = torch.rand(5, 4, 4, generator=torch.Generator().manual_seed(0))
    want = _pixel_masks(u, (IMG, IMG)).float()
    torch.testing.assert_close(fixed.extras["mask_tensors"][0], want, atol=1e-6, rtol=0)
    assert not torch.allclose(rnd.maps, clustered.maps, atol=1e-2)


# ---------------------------------------------------------------------- fast clustering is exact
@pytest.mark.parametrize("grid,size", [((4, 4), (64, 64)), ((7, 5), (50, 33)), ((14, 14), (224, 224))])
def test_grid_algebra_equals_pixel_masks(grid, size):
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(12, *grid, generator=g)
    feats[3] = 0.7  # a constant channel -> all-zero mask
    pix = _pixel_masks(feats, size)
    norm = normalised_grid_masks(feats, size)
    torch.testing.assert_close(upsample_maps(norm, size), pix, atol=1e-12, rtol=0)
    flat = pix.reshape(12, -1)
    n = flat.norm(dim=1)
    cos = (flat @ flat.T) / (n[:, None] * n[None]).clamp_min(1e-300)
    cos[n == 0] = 0
    cos[:, n == 0] = 0
    want = (1 - cos).fill_diagonal_(0)
    torch.testing.assert_close(mask_cosine_distances(norm, size), want, atol=1e-12, rtol=0)


@pytest.mark.parametrize("delta", [0.02, 0.1, 0.3, 0.6])
def test_clusters_equal_sklearn_at_pixel_resolution(delta):
    g = torch.Generator().manual_seed(2)
    # correlated channels so that clusters of several sizes appear
    base = torch.randn(6, 5, 5, generator=g)
    feats = (torch.rand(40, 6, generator=g) ** 3) @ base.reshape(6, -1) + 0.3 * torch.randn(40, 25, generator=g)
    feats = feats.reshape(40, 5, 5)
    size = (48, 48)
    ours = agglomerative_labels(mask_cosine_distances(normalised_grid_masks(feats, size), size), delta)
    ref = _sklearn_labels(_pixel_masks(feats, size), delta)
    assert _same_partition(ours, ref)
    assert sorted(set(ours.tolist())) == list(range(len(set(ours.tolist()))))
    firsts = [int(np.nonzero(ours == k)[0][0]) for k in range(ours.max() + 1)]
    assert firsts == sorted(firsts)  # clusters ordered by smallest member


# ---------------------------------------------------------------------- behaviour and errors
def _linkage_margin(a, x, delta):
    """Smallest |merge height - delta| of the complete-linkage trees of the images' feature masks."""
    from scipy.cluster.hierarchy import linkage
    from scipy.spatial.distance import squareform

    with torch.no_grad():
        _, feats = a.feature_maps(x, None, "attn_branch")
    size = tuple(x.shape[-2:])
    heights = [linkage(squareform(mask_cosine_distances(normalised_grid_masks(f, size), size).numpy(), checks=False),
                       method="complete")[:, 2] for f in feats]
    return float(np.abs(np.concatenate(heights) - delta).min())


def test_seeded_and_batch_independent():
    a = vitlens.wrap_model(tiny_timm("vit"))
    x = _images(3)
    kw = dict(method="vitcx", normalise=False, return_masks=True)
    e1 = vitlens.explain(a, x, target=[1, 2, 3], batch_size=5, **kw)
    e2 = vitlens.explain(a, x, target=[1, 2, 3], batch_size=64, **kw)
    one = vitlens.explain(a, x[2:], target=3, **kw)
    other = vitlens.explain(a, x, target=[1, 2, 3], seed=1, **kw)
    # Batch shapes change float32 summation order (~1e-6 relative on the features), so equal clusters are
    # guaranteed only when no merge height is that close to the threshold: check this data has a clear margin.
    assert _linkage_margin(a, x, 0.1) > 1e-4
    for got, want in zip(e1.extras["cluster_labels"][2:], one.extras["cluster_labels"]):
        assert _same_partition(got, want)
    # raw (un-normalised) saliency: min-max would divide rounding by the map's range
    close_to_scale(e1.maps, e2.maps, rtol=1e-4)
    close_to_scale(e1.maps[2:], one.maps, rtol=1e-4)
    # another noise seed changes the map by far more than rounding (10x the 1e-4 relative bound used above;
    # with the default norm1 features the tiny model gives many masks, so the noise averages out more)
    diff = (e1.maps - other.maps).abs().amax()
    assert diff > 1e-3 * e1.maps.abs().amax()


def test_no_backward_no_parameter_change():
    m = tiny_timm("vit")
    before = {k: v.clone() for k, v in m.state_dict().items()}
    exp = vitlens.explain(m, _images(1), method="vitcx", target=0)
    assert exp.maps.grad_fn is None
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k])


def test_errors(tiny_vit):
    x = _images(1)
    with pytest.raises(InputError, match="masks"):
        vitlens.explain(tiny_vit, x, method="vitcx", masks="kmeans")
    with pytest.raises(InputError, match="causal_score"):
        vitlens.explain(tiny_vit, x, method="vitcx", causal_score="rise")
    with pytest.raises(InputError, match="delta"):
        vitlens.explain(tiny_vit, x, method="vitcx", delta=-1)
    with pytest.raises(InputError, match="parameter 'site' of method 'vitcx' takes one of 'input'"):
        vitlens.explain(tiny_vit, x, method="vitcx", site="attn")
    with pytest.raises(InputError, match="'feature' of method 'vitcx' is now 'site'"):
        vitlens.explain(tiny_vit, x, method="vitcx", feature="norm1")
    with pytest.raises(InputError, match=r"layers \[5\] out of range"):
        vitlens.explain(tiny_vit, x, method="vitcx", layers=[5])
    with pytest.raises(TargetError):
        vitlens.explain(tiny_vit, x, method="vitcx", target="a photo of a cat")  # not a CLIP model


def test_layer_choice_changes_features():
    m = tiny_timm("vit")
    x = _images(1)
    first = vitlens.explain(m, x, method="vitcx", target=0, layers=[0], return_masks=True)
    last = vitlens.explain(m, x, method="vitcx", target=0, layers=[-1], return_masks=True)
    default = vitlens.explain(m, x, method="vitcx", target=0, return_masks=True)
    torch.testing.assert_close(default.maps, last.maps, rtol=0, atol=0)  # the same computation: bit-identical
    assert first.extras["n_masks"] != last.extras["n_masks"] or not torch.allclose(first.maps, last.maps)
