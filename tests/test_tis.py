"""TIS (Englebert et al. 2023) against a slow implementation of eqs. (1)-(5) written here, using each
library's own modules for the forward passes on token subsets."""
from __future__ import annotations

import pytest
import torch

import vitlens
from vitlens.kmeans import kmeans
from vitlens.methods.tis import coverage_weighted_sum

from conftest import close_to_scale, tiny_open_clip, tiny_timm, tiny_torchvision


# ----------------------------------------------------------------------------- slow reference
def _timm_parts(m):
    def embed(x):
        return m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(x))))

    def blocks(t, record=None):
        for blk in m.blocks:
            t = blk(t)
            if record is not None:
                record.append(t)
        return t

    return embed, blocks, lambda t: m.forward_head(m.norm(t)), m.num_prefix_tokens


def _torchvision_parts(m):
    def embed(x):
        t = m._process_input(x)
        return torch.cat([m.class_token.expand(t.shape[0], -1, -1), t], 1) + m.encoder.pos_embedding

    def blocks(t, record=None):
        for layer in m.encoder.layers:
            t = layer(t)
            if record is not None:
                record.append(t)
        return t

    return embed, blocks, lambda t: m.heads(m.encoder.ln(t)[:, 0]), 1


def _clip_parts(m):
    v = m.visual

    def embed(x):
        t = v.conv1(x).flatten(2).transpose(1, 2)
        t = torch.cat([v.class_embedding.reshape(1, 1, -1).expand(t.shape[0], -1, -1), t], 1)
        return v.ln_pre(t + v.positional_embedding)

    def blocks(t, record=None):
        for blk in v.transformer.resblocks:
            t = blk(t)
            if record is not None:
                record.append(t)
        return t

    return embed, blocks, lambda t: v.ln_post(t)[:, 0] @ v.proj, 1


def slow_tis(parts, x, score_fn, n_masks, ratio, seed):
    """Eqs. (1)-(5) one mask at a time; score_fn(outputs) -> scalar."""
    embed, blocks, head, P = parts
    with torch.no_grad():
        emb = embed(x)
        rec = []
        blocks(emb, rec)
        A = torch.cat([r[0, P:] for r in rec], dim=-1)  # (N_t, L*D), eq. (1) input
        n_tokens = A.shape[0]
        K, _ = kmeans(A.T.contiguous(), n_masks, seed=seed)  # centroids (N_m, N_t)
        n_keep = round(ratio * n_tokens)
        num = [0.0] * n_tokens
        cov = [0.0] * n_tokens
        for j in range(K.shape[0]):
            c = K[j].tolist()
            kept = sorted(sorted(range(n_tokens), key=lambda t: (-c[t], t))[:n_keep])  # eq. (2)
            seq = torch.cat([emb[:, :P], emb[:, P:][:, kept]], dim=1)  # eq. (3)
            w = float(score_fn(head(blocks(seq))))  # eq. (4)
            for t in kept:
                num[t] += w
                cov[t] += 1
        return torch.tensor([num[t] / cov[t] if cov[t] else 0.0 for t in range(n_tokens)])  # eq. (5)


@pytest.mark.parametrize("family", ["timm", "timm_registers", "torchvision"])
def test_tis_matches_slow_equations(family, images):
    if family == "timm":
        m = tiny_timm("vit")
        parts = _timm_parts(m)
    elif family == "timm_registers":
        m = tiny_timm("vit", reg_tokens=2)
        parts = _timm_parts(m)
    else:
        m = tiny_torchvision()
        with torch.no_grad():  # torchvision zero-initialises its head: constant scores would test nothing
            m.heads.head.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
        parts = _torchvision_parts(m)
    x = images[:1]
    target = 3
    exp = vitlens.explain(m, x, "tis", target=target, n_masks=12, ratio=0.5, seed=5, normalise=False)
    ref = slow_tis(parts, x, lambda o: o.softmax(-1)[0, target], 12, 0.5, seed=5)
    # batched subset forwards vs one mask at a time: same maths, other float32 order
    close_to_scale(exp.token_maps[0].reshape(-1), ref, rtol=1e-4)
    # logit scores (option) change the weights w_j
    exp_l = vitlens.explain(m, x, "tis", target=target, n_masks=12, seed=5, normalise=False, score="logit")
    ref_l = slow_tis(parts, x, lambda o: o[0, target], 12, 0.5, seed=5)
    close_to_scale(exp_l.token_maps[0].reshape(-1), ref_l, rtol=1e-4)


def test_tis_text_prompt_on_clip(images):
    import open_clip
    import torch.nn.functional as F

    m = tiny_open_clip()
    prompt = "a photo of a cat"
    with torch.no_grad():
        txt = F.normalize(m.encode_text(open_clip.tokenize([prompt])), dim=-1)[0]
    exp = vitlens.explain(m, images[:1], "tis", target=prompt, n_masks=10, seed=1, normalise=False)
    ref = slow_tis(_clip_parts(m), images[:1], lambda o: (F.normalize(o, dim=-1)[0] * txt).sum(), 10, 0.5, seed=1)
    close_to_scale(exp.token_maps[0].reshape(-1), ref, rtol=1e-4)
    assert exp.labels == [prompt] and exp.targets.tolist() == [-1]


def test_tis_batch_equals_single_images(images):
    m = tiny_timm("vit")
    # raw maps: min-max normalisation would divide the rounding by each map's range
    both = vitlens.explain(m, images, "tis", target=[1, 2], n_masks=16, seed=0, normalise=False)
    for i, t in enumerate([1, 2]):
        one = vitlens.explain(m, images[i:i + 1], "tis", target=t, n_masks=16, seed=0, normalise=False)
        close_to_scale(both.token_maps[i], one.token_maps[0], rtol=1e-4)  # batch of 2 vs 1: other GEMM shapes


def test_tis_batch_size_does_not_change_result(images):
    m = tiny_timm("vit")
    a = vitlens.explain(m, images, "tis", n_masks=16, seed=0, batch_size=3, normalise=False)
    b = vitlens.explain(m, images, "tis", n_masks=16, seed=0, batch_size=64, normalise=False)
    close_to_scale(a.token_maps, b.token_maps, rtol=1e-4)  # forward batches of 3 vs 32 masks: other GEMM shapes


def test_tis_seeded_and_seed_sensitive(images):
    m = tiny_timm("vit")
    a = vitlens.explain(m, images[:1], "tis", n_masks=16, seed=0, normalise=False)
    b = vitlens.explain(m, images[:1], "tis", n_masks=16, seed=0, normalise=False)
    c = vitlens.explain(m, images[:1], "tis", n_masks=16, seed=1, normalise=False)
    assert torch.equal(a.token_maps, b.token_maps)
    assert not torch.equal(a.token_maps, c.token_maps)


def test_tis_clamps_masks_with_warning(images):
    m = tiny_timm("vit", depth=1, embed_dim=24, num_heads=2)  # 24 activation columns
    with pytest.warns(UserWarning, match="exceeds the 24 activation columns"):
        exp = vitlens.explain(m, images[:1], "tis", n_masks=100, seed=0)
    assert exp.extras["n_masks"] == 24


def test_tis_global_pool_model_without_prefix(images):
    m = tiny_timm("vit", class_token=False, global_pool="avg")
    exp = vitlens.explain(m, images[:1], "tis", target=0, n_masks=8, seed=0, normalise=False)
    ref = slow_tis(_timm_parts(m), images[:1], lambda o: o.softmax(-1)[0, 0], 8, 0.5, seed=0)
    close_to_scale(exp.token_maps[0].reshape(-1), ref, rtol=1e-4)


def test_coverage_weighted_sum_uncovered_tokens_are_zero():
    keep = torch.tensor([[[0, 1], [1, 2]]])  # token 3 never kept
    w = torch.tensor([[0.2, 0.6]])
    out = coverage_weighted_sum(keep, w, 4)
    torch.testing.assert_close(out, torch.tensor([[0.2, 0.4, 0.6, 0.0]]))


def test_explain_outputs_and_ranges(images):
    m = tiny_timm("vit")
    exp = vitlens.explain(m, images, "tis", n_masks=8, with_scores=True)
    assert exp.maps.shape == (2, 64, 64) and exp.token_maps.shape == (2, 4, 4)
    assert float(exp.maps.min()) == 0.0 and float(exp.maps.max()) == 1.0
    with torch.no_grad():
        probs = m(images).softmax(-1)
    torch.testing.assert_close(exp.scores, probs.max(-1).values)
    assert exp.targets.tolist() == probs.argmax(-1).tolist()


def test_explain_errors(images):
    m = tiny_timm("vit")
    with pytest.raises(vitlens.UnknownMethodError, match="unknown method 'nope'"):
        vitlens.explain(m, images, "nope")
    with pytest.raises(vitlens.InputError, match="unknown parameter.*n_mask"):
        vitlens.explain(m, images, "tis", n_mask=3)
    with pytest.raises(vitlens.InputError, match="ratio"):
        vitlens.explain(m, images, "tis", ratio=0.0, n_masks=4)
    with pytest.raises(vitlens.TargetError, match="out of range"):
        vitlens.explain(m, images, "tis", target=99, n_masks=4)


# ----------------------------------------------------------------------------- k-means
def test_kmeans_matches_sklearn_lloyd_from_same_init():
    from sklearn.cluster import KMeans

    g = torch.Generator().manual_seed(0)
    pts = torch.cat([torch.randn(40, 5, generator=g) + c for c in (0.0, 4.0, -4.0)]).double()
    init = pts[[0, 45, 90, 10]].clone()
    ours_c, ours_l = kmeans(pts.float(), 4, centroids=init.float(), max_iter=300, tol=0.0)
    sk = KMeans(4, init=init.numpy(), n_init=1, max_iter=300, tol=0.0, algorithm="lloyd").fit(pts.numpy())
    assert ours_l.tolist() == sk.labels_.tolist()
    torch.testing.assert_close(ours_c, torch.from_numpy(sk.cluster_centers_).float(), atol=1e-5, rtol=1e-5)


def test_kmeans_batched_equals_separate():
    g = torch.Generator().manual_seed(1)
    pts = torch.randn(3, 50, 6, generator=g)
    init = pts[:, :5].clone()
    c_b, l_b = kmeans(pts, 5, centroids=init)
    for b in range(3):
        c, l = kmeans(pts[b], 5, centroids=init[b])
        # distances come from a bmm of another batch shape: labels are equal unless a point is within rounding
        # of two centroids, so check this data keeps a clear margin between nearest and second-nearest centroid
        d = torch.cdist(pts[b].double(), c.double()).sort(-1).values
        assert float((d[:, 1] - d[:, 0]).min()) > 1e-4
        assert torch.equal(l_b[b], l)
        torch.testing.assert_close(c_b[b], c, rtol=1e-5, atol=1e-5)  # means of the same points (scale ~1)


def test_kmeans_plusplus_and_errors():
    pts = torch.randn(30, 4, generator=torch.Generator().manual_seed(4))
    c, l = kmeans(pts, 3, init="k-means++", seed=3)
    c2, l2 = kmeans(pts, 3, init="k-means++", seed=3)
    assert torch.equal(c, c2)
    # k-means++ centroids are a fixed point of the Lloyd update at convergence
    for k in range(3):
        if (l == k).any():
            torch.testing.assert_close(c[k], pts[l == k].mean(0), atol=1e-5, rtol=1e-5)
    with pytest.raises(vitlens.InputError, match="k-means needs"):
        kmeans(pts, 31)


# ----------------------------------------------------------------------------- real model
@pytest.mark.integration
def test_tis_pointing_game_on_real_vit(real_model, shared_pointing):
    """TIS points at the labelled object clearly more often than the centre pixel does.

    Fixed subset: the first 24 images (sorted by id) whose boxes cover at most half of the crop;
    N_m = 128 masks to keep CI fast (the full N_m = 1024 figure over all 200 images is in the note).
    """
    from vitlens.metrics import pointing_hits

    ds, keep, masks, cov = shared_pointing
    n = 24
    ids = keep[:n]
    x = real_model.preprocess([ds[i].path for i in ids])
    exp = vitlens.explain(real_model, x, "tis", target=[ds[i].label for i in ids], n_masks=128, seed=0)
    hits = pointing_hits(exp.maps, masks[:n], coverage=cov[:n])
    centre = torch.zeros(n, 224, 224)
    centre[:, 112, 112] = 1
    base = pointing_hits(centre, masks[:n], coverage=cov[:n])
    rate, base_rate = float(hits.nanmean()), float(base.nanmean())
    assert rate >= base_rate + 0.15, (rate, base_rate)
