"""The TIS evaluation protocols (``protocol="tis_code"``), the TIS data pipeline and subset, and the
papers' presets, each against a slow reference written here from the authors' code as read in
aenglebert/Transformer_Input_Sampling (``metrics/``, ``config/``, ``datasets/``), jacobgil/vit-explain
(rollout) and Captum (``sensitivity_max``)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import vitlens
from vitlens.errors import InputError
from vitlens.metrics import deletion, get_metric, insertion
from vitlens.metrics.causal import make_substrate, tis_blur

from conftest import IMG, SHARED

SUBSTRATES = ("blur", "black", "mean", "random")


# ----------------------------------------------------------------------------- slow references
def _ref_baseline(x1, kind, seed=0):
    """TIS ``metrics/utils.py`` baselines of one (1, 3, H, W) normalised image."""
    import torchvision.transforms.functional as TF

    if kind == "blur":
        return TF.gaussian_blur(x1, kernel_size=[11, 11], sigma=[5, 5])
    if kind == "black":
        return torch.zeros_like(x1)
    if kind == "mean":
        return torch.ones_like(x1) * x1.mean()
    if kind == "random":  # rand_like, drawn from a generator seeded as vitlens seeds its substrate
        return torch.rand(x1.shape, generator=torch.Generator().manual_seed(seed))
    raise ValueError(kind)


def _ref_tis_scores(model, x1, sal, target, mode, baseline, n_steps, batch_size=8):
    """TIS ``RelevanceMetric.__call__`` + ``Insertion/Deletion.generate_samples``: one image."""
    h, w = x1.shape[-2:]
    # TIS ran this argsort on CUDA, where a 50176-long row is radix-sorted stably; torch's CPU argsort is
    # not stable, so the stable order is requested explicitly to reproduce the CUDA run's tie order
    sorted_index = torch.flip(sal.reshape(-1, h * w).argsort(stable=True), dims=[-1])
    per = math.ceil(h * w / n_steps)
    samples = torch.ones(n_steps, *x1.shape[-3:]) * (x1 if mode == "deletion" else baseline)
    src = baseline if mode == "deletion" else x1
    for step in range(n_steps):
        pixels = sorted_index[:, :per * (step + 1)]
        samples[step].view(-1, h * w)[..., pixels] = src.reshape(-1, h * w)[..., pixels]
    scores = torch.zeros(n_steps)
    with torch.no_grad():
        for i in range(math.ceil(n_steps / batch_size)):
            sl = slice(i * batch_size, min((i + 1) * batch_size, n_steps))
            scores[sl] = torch.softmax(model(samples[sl]), dim=1)[:, target]
    return scores


def _ref_pointing(sal, boxes, max_overlap=0.5):
    """TIS ``PointingGame.__call__`` (boxes: list of (x0, y0, x1, y1) on the input grid)."""
    h, w = sal.shape[-2:]
    bmap = torch.zeros((w, h))
    for x0, y0, x1, y1 in boxes:
        bmap[int(y0):int(y1), int(x0):int(x1)] = 1
    if (bmap.sum() / torch.ones((w, h)).sum()) < max_overlap:
        return float(bmap.flatten()[sal.flatten().argmax()])
    return float("nan")


def _ref_sparseness(sal):
    """TIS ``Sparseness(shift=True).__call__`` (float32, as the code)."""
    sal = sal - sal.amin()
    flat = torch.flatten(sal) + 0.0000001
    n = flat.size()[0]
    srt = torch.sort(flat).values
    rank = torch.arange(1, n + 1)
    return float(torch.sum((rank * 2 - n - 1) * srt) / (n * torch.sum(srt)))


# ----------------------------------------------------------------------------- substrates
def test_tis_blur_is_torchvision_gaussian_blur():
    import torchvision.transforms.functional as TF

    x = torch.randn(2, 3, 40, 33, generator=torch.Generator().manual_seed(0))
    want = TF.gaussian_blur(x, kernel_size=[11, 11], sigma=[5, 5])  # reflect padding, its own kernel
    # float32 convolutions of values ~N(0,1) with a kernel summing to 1: summation order only
    torch.testing.assert_close(tis_blur(x), want, atol=1e-5, rtol=1e-5)


def test_tis_blur_rejects_images_smaller_than_its_reflect_padding():
    with pytest.raises(InputError, match="reflection"):
        tis_blur(torch.zeros(1, 3, 5, 40))


def test_tis_substrates_are_built_on_the_normalised_tensor(tiny_vit, images):
    x = images
    z = make_substrate(tiny_vit, x, "black", space="normalised")
    assert torch.equal(z, torch.zeros_like(x))  # zeros of the normalised tensor, not pixel black
    m = make_substrate(tiny_vit, x, "mean", space="normalised")
    for b in range(2):  # one scalar per image: the mean over channels and pixels
        torch.testing.assert_close(m[b], torch.full_like(x[b], float(x[b].mean())), atol=1e-6, rtol=1e-6)
    r = make_substrate(tiny_vit, x, "random", space="normalised", seed=4)
    noise = torch.rand((1, *x.shape[1:]), generator=torch.Generator().manual_seed(4))
    assert torch.equal(r, noise.expand_as(x))  # one seeded noise image, whatever the batch
    assert float(r.min()) >= 0 and float(r.max()) < 1


# ----------------------------------------------------------------------------- curves, ties, AUC
@pytest.mark.parametrize("mode", ["insertion", "deletion"])
@pytest.mark.parametrize("kind", SUBSTRATES)
def test_tis_code_curves_equal_reference(tiny_vit, images, mode, kind):
    g = torch.Generator().manual_seed(3)
    maps = torch.rand(2, IMG, IMG, generator=g)
    maps[0, :10] = 0.5  # ties: the code's flip(argsort) order decides
    maps[1] = (maps[1] * 8).round() / 8  # many ties everywhere
    targets = [3, 7]
    n = 8
    fn = insertion if mode == "insertion" else deletion
    res = fn(tiny_vit, images, maps, targets, protocol="tis_code", substrate=kind, n_steps=n, batch_size=5)
    assert res.curves.shape == (2, n)
    torch.testing.assert_close(res.xs, torch.arange(1, n + 1, dtype=torch.float32) / n)
    for b in range(2):
        base = _ref_baseline(images[b:b + 1], kind)
        ref = _ref_tis_scores(tiny_vit.forward, images[b:b + 1], maps[b], targets[b], mode, base, n)
        # same images, same forward passes in other batch groupings: float32 rounding only
        torch.testing.assert_close(res.curves[b], ref, atol=2e-6, rtol=1e-5)
        assert abs(float(res.values[b]) - float(ref.double().mean())) < 1e-6  # AUC = mean of the n scores
    assert res.protocol["auc"].startswith("mean")


def test_tis_code_ties_reverse_raster(tiny_vit, images):
    """Equal saliency: the later raster pixel is changed first (flip of a stable ascending argsort)."""
    ramp = torch.arange(IMG * IMG, dtype=torch.float32).reshape(1, IMG, IMG).repeat(2, 1, 1)
    for m in (torch.zeros(2, IMG, IMG), torch.full((2, IMG, IMG), 0.25)):
        got = deletion(tiny_vit, images, m, [1, 2], protocol="tis_code", substrate="black", n_steps=8)
        want = deletion(tiny_vit, images, ramp, [1, 2], protocol="tis_code", substrate="black", n_steps=8)
        torch.testing.assert_close(got.curves, want.curves)
        paper = deletion(tiny_vit, images, m, [1, 2], protocol="paper", substrate="black", n_steps=8)
        assert not torch.allclose(paper.curves[:, 1:-1], want.curves[:, :-1])  # the other order


def test_tis_code_ranks_upsampled_raw_maps(tiny_vit, images):
    """raw_maps (native 4 x 4) are upsampled as torchvision Resize does before ranking."""
    from torchvision.transforms import Resize

    raw = torch.rand(2, 4, 4, generator=torch.Generator().manual_seed(5)) * 1e-3 + 0.2
    # TIS's torchvision 0.13 Resize on tensors had antialias off (enlarging: plain bilinear, half-pixel)
    up = Resize((IMG, IMG), antialias=False)(raw[:, None])[:, 0]
    a = insertion(tiny_vit, images, torch.zeros(2, IMG, IMG), [0, 1], protocol="tis_code", n_steps=8, raw_maps=raw)
    b = insertion(tiny_vit, images, up, [0, 1], protocol="tis_code", n_steps=8)
    torch.testing.assert_close(a.curves, b.curves)
    assert a.protocol["ranked"] == "raw_maps upsampled"


# ----------------------------------------------------------------------------- pointing game, sparseness
def test_pointing_game_tis_code_equals_reference():
    pg = get_metric("pointing_game").fn
    H = W = 32
    g = torch.Generator().manual_seed(0)
    maps = torch.rand(5, H, W, generator=g)
    maps[1] = 0.0
    maps[1, 20, 3] = maps[1, 2, 3] = 1.0  # two maxima: argmax takes the first (row 2)
    boxes = [
        [[1.7, 1.2, 9.9, 8.6]],                       # fractional coordinates: int() truncation
        [[0.0, 0.0, 10.0, 5.0]],                      # first max (2, 3) inside, second outside
        [],                                           # boxes cropped away: coverage 0 -> a miss
        [[0.0, 0.0, 32.0, 16.0]],                     # exactly half: not < 0.5 -> excluded
        [[0.0, 0.0, 32.0, 15.9], [20.5, 20.5, 31, 31]],
    ]
    maps[0, 5, 5] = 2.0  # inside box 0
    res = pg(None, torch.zeros(5, 3, H, W), maps, None, boxes=torch.zeros(5, H, W, dtype=torch.bool),
             protocol="tis_code", box_coords=[np.asarray(b).reshape(-1, 4) for b in boxes])
    want = [_ref_pointing(maps[i], boxes[i]) for i in range(5)]
    np.testing.assert_array_equal(res.values.numpy(), np.asarray(want, dtype=np.float32))
    assert want[0] == 1 and want[1] == 1 and want[2] == 0 and math.isnan(want[3])
    with pytest.raises(InputError, match="box_coords"):
        pg(None, torch.zeros(5, 3, H, W), maps, None, boxes=None, protocol="tis_code")


def test_sparseness_tis_code_on_raw_maps():
    sp = get_metric("sparseness").fn
    g = torch.Generator().manual_seed(2)
    raw = torch.randn(3, 14, 14, generator=g) * 1e-3  # small raw values: the + 1e-7 guard matters
    raw[2] = 0.5  # constant
    from torchvision.transforms import Resize

    up = Resize((224, 224), antialias=False)(raw[:, None])[:, 0]
    res = sp(None, torch.zeros(3, 3, 224, 224), torch.zeros(3, 224, 224), protocol="tis_code", raw_maps=raw)
    want = torch.tensor([_ref_sparseness(up[i]) for i in range(3)])
    # float32 sums of 50176 terms in the reference vs float64 here: relative 1e-4
    torch.testing.assert_close(res.values, want, atol=1e-5, rtol=1e-4)
    tiny = sp(None, torch.zeros(3, 3, 224, 224), torch.zeros(3, 224, 224), protocol="tis_code",
              raw_maps=raw * 1e-4)
    assert float(res.values[0] - tiny.values[0]) > 1e-2  # the raw scale matters through the + 1e-7 guard


# ----------------------------------------------------------------------------- max-sensitivity
def test_max_sensitivity_tis_code_equals_captum_on_raw_maps(tiny_vit, images):
    """Captum's sensitivity_max with the perturbations vitlens draws, on the raw native token maps."""
    from captum.metrics import sensitivity_max

    ms = get_metric("max_sensitivity").fn
    n, r, seed = 4, 0.02, 3
    params = dict(discard_ratio=0.5)
    res = ms(tiny_vit, images, torch.zeros(2, IMG, IMG), [1, 2], method="rollout", method_params=params,
             radius=r, n_samples=n, seed=seed, protocol="tis_code")
    # each image's n draws come from a generator seeded with ``seed`` (Captum on a batch of one image)
    noise = torch.empty(n, 3, IMG, IMG).uniform_(-r, r, generator=torch.Generator().manual_seed(seed))

    def raw(x):
        return vitlens.explain(tiny_vit, x, method="rollout", target=0, normalise=False, **params).token_maps

    for b in range(2):
        draws = iter(noise)

        def perturb(inputs, perturb_radius=r):
            d = next(draws)[None]
            return tuple(i + d for i in inputs) if isinstance(inputs, tuple) else inputs + d

        def expl(x):  # Captum passes the inputs as a tuple to this call and as a tensor to others
            return raw(x[0] if isinstance(x, tuple) else x)[:, None]

        want = sensitivity_max(expl, images[b:b + 1], perturb_func=perturb,
                               n_perturb_samples=n, max_examples_per_batch=1)
        torch.testing.assert_close(res.values[b], want[0].float(), atol=1e-5, rtol=1e-4)


# ----------------------------------------------------------------------------- rollout as vit-explain
def test_rollout_vit_explain_equals_reference(tiny_vit, images):
    ratio = 0.6
    tr = tiny_vit.trace(images, attn=True)
    for b in range(2):
        result = torch.eye(tr.attn[0].shape[-1])
        for att in tr.attn:  # vit_rollout.rollout of vit-explain, one image
            fused = att[b:b + 1].mean(axis=1)
            flat = fused.view(fused.size(0), -1)
            order = torch.sort(flat, dim=-1, stable=True).indices  # topk(largest=False), ties by index
            indices = order[:, :int(flat.size(-1) * ratio)]
            indices = indices[indices != 0]
            flat[0, indices] = 0
            eye = torch.eye(fused.size(-1))
            a = (fused + 1.0 * eye) / 2
            a = a / a.sum(dim=-1)
            result = torch.matmul(a, result)
        mask = result[0, 0, 1:]
        mask = (mask / mask.max()).reshape(4, 4)
        got = vitlens.explain(tiny_vit, images[b:b + 1], method="rollout", discard_ratio=ratio,
                              variant="vit_explain", normalise=False).token_maps[0]
        torch.testing.assert_close(got, mask, atol=1e-6, rtol=1e-5)


# ----------------------------------------------------------------------------- transform and subset
def _ref_bilinear(a, out_h, out_w):
    """OpenCV INTER_LINEAR / half-pixel bilinear, written per axis: (h, w, c) -> (out_h, out_w, c)."""
    def axis(n_in, n_out):
        src = (np.arange(n_out) + 0.5) * n_in / n_out - 0.5
        src = np.clip(src, 0, None)
        i0 = np.minimum(np.floor(src).astype(int), n_in - 1)
        i1 = np.minimum(i0 + 1, n_in - 1)
        return i0, i1, src - i0

    y0, y1, wy = axis(a.shape[0], out_h)
    x0, x1, wx = axis(a.shape[1], out_w)
    rows = a[y0] * (1 - wy)[:, None, None] + a[y1] * wy[:, None, None]
    return rows[:, x0] * (1 - wx)[None, :, None] + rows[:, x1] * wx[None, :, None]


def test_tis_transform_and_boxes():
    from PIL import Image

    from vitlens.data.transforms import tis_boxes, tis_image

    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (300, 410, 3), dtype=np.uint8)
    got = tis_image(Image.fromarray(arr))
    a = (arr.astype(np.float64) / 255 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    want = _ref_bilinear(a, 256, 256)[16:240, 16:240].transpose(2, 0, 1)
    assert got.shape == (3, 224, 224)
    np.testing.assert_allclose(got.numpy(), want, atol=1e-4)  # float32 vs float64 of values ~|2|
    boxes = np.array([[41.0, 30.0, 205.0, 150.0], [0.0, 0.0, 60.0, 60.0], [400.0, 290.0, 410.0, 300.0]])
    tb = tis_boxes(boxes, (410, 300))
    sx, sy = 256 / 410, 256 / 300
    np.testing.assert_allclose(tb[0], [41 * sx - 16, 30 * sy - 16, 205 * sx - 16, 150 * sy - 16])
    np.testing.assert_allclose(tb[1], [0, 0, 60 * sx - 16, 60 * sy - 16])  # a corner box clipped to [0, 224]
    assert len(tb) == 2  # the bottom-right box lies in the cropped-away border: dropped


def test_tis5000_subset_indices_and_order():
    from vitlens.data.subsets import resolve_subset, subset_indices

    idx = subset_indices("tis5000")
    assert len(idx) == 5000 and len(set(idx)) == 5000
    assert idx[0] == 17739 and idx[-1] == 8421  # first/last lines of config/dataset/indices/sub5000.yaml
    assert 0 <= min(idx) and max(idx) < 50000
    rng = np.random.default_rng(1)
    syns = [f"n{int(s):08d}" for s in rng.integers(0, 1000, 50000)]
    records = [(f"ILSVRC2012_val_{i + 1:08d}", syns[i]) for i in range(50000)]
    # ImageFolder order: classes by sorted wnid, files sorted within each class
    by_class: dict = {}
    for iid, syn in records:
        by_class.setdefault(syn, []).append(iid)
    folder = [iid for syn in sorted(by_class) for iid in sorted(by_class[syn])]
    assert resolve_subset("tis5000", records[::-1]) == [folder[i] for i in idx]
    with pytest.raises(InputError, match="50000"):
        resolve_subset("tis5000", records[:500])


# ----------------------------------------------------------------------------- presets
def test_presets_pinned():
    from vitlens.bench.presets import get_preset

    p = get_preset("tis-vit")
    assert p["model"] == "vit_base_patch16_224.orig_in21k_ft_in1k"
    assert (p["transform"], p["subset"], p["target"]) == ("tis", "tis5000", "label")
    m = p["methods"]
    assert m["rise"] == {"n_masks": 4000, "s": 8, "p": 0.1, "score": "logit", "baseline": "zero"}
    assert m["rollout"] == {"discard_ratio": 0.9, "head_fusion": "mean", "variant": "vit_explain"}
    assert m["bt_head"]["layers"] is None and m["bt_token"]["layers"] is None
    assert m["tam"] == {"layers": None, "steps": 20} and m["vitcx"] == {"site": "norm1"}
    assert m["tis"]["n_masks"] == 1024 and m["tis"]["ratio"] == 0.5 and m["tis"]["normalise_output"]
    assert m["integrated_gradients"] == {"n_steps": 50, "ig_method": "gausslegendre", "baseline": "zero",
                                         "reduce": "sum", "score": "logit"}
    assert m["smoothgrad"]["noise_sigma"] == 1.0 and m["smoothgrad"]["n_samples"] == 50
    assert "gradcam" not in m
    mp = p["metric_params"]
    for mode in ("insertion", "deletion"):
        for s in SUBSTRATES:
            assert mp[f"{mode}_{s}"] == {"metric": mode, "protocol": "tis_code", "substrate": s, "n_steps": 224,
                                         "score": "prob"}
    assert mp["pointing_game"]["protocol"] == mp["sparseness"]["protocol"] == "tis_code"
    assert mp["max_sensitivity"] == {"protocol": "tis_code", "radius": 0.02, "n_samples": 10}
    assert get_preset("tis-deit")["model"] == "deit_base_patch16_224.fb_in1k"
    v = get_preset("vitcx")
    assert v["model"] == "vit_base_patch16_224.augreg_in21k_ft_in1k" and v["target"] == "predicted"
    assert v["metric_params"]["deletion"]["protocol"] == v["metric_params"]["insertion"]["protocol"] == "rise_code"
    assert "tis" not in v["methods"]
    assert get_preset("vitcx-deit")["model"] == "deit_base_distilled_patch16_224.fb_in1k"
    assert get_preset("vitcx-swin")["methods"]["vitcx"] == {"delta": 0.05}


def test_print_config_is_fully_resolved(capsys):
    from vitlens.bench.cli import main

    assert main(["--preset", "tis-vit", "--print-config", "--metric-param", "insertion_blur.n_steps=16",
                 "--methods", "tis,rise"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["model"] == "vit_base_patch16_224.orig_in21k_ft_in1k" and d["transform"] == "tis"
    assert set(d["methods"]) == {"tis", "rise"} and d["methods"]["rise"]["n_masks"] == 4000
    assert d["methods"]["tis"]["kmeans_init"] == "random"  # method defaults filled in
    assert d["metrics"]["insertion_blur"]["n_steps"] == 16 and d["metrics"]["insertion_blur"]["substrate"] == "blur"
    assert d["metrics"]["deletion_random"] == {"metric": "deletion", "protocol": "tis_code", "substrate": "random",
                                               "n_steps": 224, "score": "prob", "blur_kernel": 11,
                                               "blur_sigma": 5.0, "seed": 0}


@pytest.mark.parametrize("preset", sorted(__import__("vitlens.bench.presets", fromlist=["PRESETS"]).PRESETS))
def test_every_preset_prints_its_config(preset, capsys):
    """--print-config works for every preset, also those whose metrics depend on the dataset (LeGrad's)."""
    from vitlens.bench.cli import main
    from vitlens.bench.presets import get_preset

    assert main(["--preset", preset, "--print-config"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["model"] == get_preset(preset)["model"]
    assert set(d["methods"]) == set(get_preset(preset)["methods"])


def test_config_file_values_are_converted_and_checked(tmp_path, capsys):
    """Method/metric values of a TOML config get the declared types (as --method-param does) and a value
    of the wrong type is a one-line error naming the file, the parameter and the expected type."""
    from vitlens.bench.cli import main

    good = tmp_path / "good.toml"
    good.write_text('metrics = ["insertion"]\n[methods.tis]\nn_masks = "256"\nratio = 1\n'
                    '[metric_params.insertion]\nn_steps = "16"\n')
    assert main(["--config", str(good), "--print-config"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["methods"]["tis"]["n_masks"] == 256 and isinstance(d["methods"]["tis"]["ratio"], float)
    assert d["metrics"]["insertion"]["n_steps"] == 16
    bad = tmp_path / "bad.toml"
    bad.write_text('metrics = ["insertion"]\n[methods.tis]\nn_masks = "many"\n')
    assert main(["--config", str(bad), "--print-config"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bad.toml" in err[0] and "tis.n_masks=many" in err[0] and "an integer" in err[0]
    # a bad command-line value on top of a good file is blamed on the command-line flag, not on the file
    assert main(["--config", str(good), "--method-param", "tis.n_masks=lots", "--print-config"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--method-param tis.n_masks=lots" in err[0] and "good.toml" not in err[0]


# ----------------------------------------------------------------------------- real model
@pytest.mark.integration
def test_real_vit_ti_tis_code_all_substrates(real_model):
    """tis_code insertion/deletion of TIS maps on 4 shared images (TIS pipeline), all four substrates,
    against the step-by-step reference of the TIS code (fewer steps than 224 to stay fast)."""
    from vitlens.data import ImageNetBoxes
    from vitlens.data.transforms import tis_images

    ds = ImageNetBoxes(SHARED / "data" / "imagenet-val-sample")
    samples = [ds[i] for i in range(4)]
    x = tis_images([s.path for s in samples]).to(real_model.device)
    targets = [s.label for s in samples]
    exp = vitlens.explain(real_model, x, method="tis", target=targets, n_masks=64, normalise=False)
    raw = exp.token_maps
    from torchvision.transforms import Resize

    up = Resize((224, 224), antialias=False)(raw[:, None])[:, 0]
    n = 4
    for kind in SUBSTRATES:
        for mode, fn in (("insertion", insertion), ("deletion", deletion)):
            res = fn(real_model, x, exp.maps, targets, protocol="tis_code", substrate=kind, n_steps=n,
                     raw_maps=raw, batch_size=16)
            for b in range(4):
                ref = _ref_tis_scores(real_model.forward, x[b:b + 1], up[b], targets[b], mode,
                                      _ref_baseline(x[b:b + 1], kind), n, batch_size=16)
                # identical inputs and model, other batch groupings: float32 softmax rounding only
                torch.testing.assert_close(res.curves[b], ref, atol=1e-5, rtol=1e-4)
                assert abs(float(res.values[b]) - float(ref.double().mean())) < 1e-5


@pytest.mark.integration
def test_bench_stores_raw_maps_and_feeds_tis_code_metrics(real_model, tmp_path):
    """The bench runs the TIS pipeline, stores the raw native maps (float32) beside the normalised ones,
    and its tis_code rows equal direct metric calls on those raw maps and the TIS box coordinates."""
    import sqlite3

    from vitlens.bench import BenchConfig, run_bench
    from vitlens.bench.store import decode_map
    from vitlens.data import ImageNetBoxes
    from vitlens.data.transforms import tis_images

    torch.set_num_threads(1)
    data = SHARED / "data" / "imagenet-val-sample"
    mp = {"insertion_black": {"metric": "insertion", "protocol": "tis_code", "substrate": "black", "n_steps": 4},
          "pointing_game": {"protocol": "tis_code"}, "sparseness": {"protocol": "tis_code"}}
    cfg = BenchConfig(out=str(tmp_path / "b"), model="vit_tiny_patch16_224.augreg_in21k_ft_in1k",
                      weights=str(SHARED / "models"), data=str(data), transform="tis",
                      methods={"rollout": {"discard_ratio": 0.9, "variant": "vit_explain"}},
                      metrics=list(mp), metric_params=mp, limit=2, batch_size=2, report=False)
    assert run_bench(cfg)["rows"] == 6
    ds = ImageNetBoxes(data)
    x = tis_images([ds[i].path for i in range(2)])
    labels = [ds[i].label for i in range(2)]
    raw = vitlens.explain(real_model, x, method="rollout", target=labels, discard_ratio=0.9, variant="vit_explain",
                          normalise=False).token_maps
    con = sqlite3.connect(str(tmp_path / "b" / "results.sqlite"))
    stored = [decode_map(blob, shape) for blob, shape in
              con.execute("SELECT map, shape FROM maps WHERE run_key LIKE '%:raw' ORDER BY image_id")]
    torch.testing.assert_close(torch.from_numpy(np.stack(stored)), raw, atol=0, rtol=0)  # float32, same calls
    vals = {m: [v for (v,) in con.execute("SELECT value FROM results WHERE metric=? ORDER BY image_id", (m,))]
            for m in mp}
    ins = insertion(real_model, x, torch.zeros(2, 224, 224), labels, protocol="tis_code", substrate="black",
                    n_steps=4, raw_maps=raw).values
    np.testing.assert_allclose(vals["insertion_black"], ins.numpy(), atol=1e-6)
    sp = get_metric("sparseness").fn(None, x, torch.zeros(2, 224, 224), protocol="tis_code", raw_maps=raw).values
    np.testing.assert_allclose(vals["sparseness"], sp.numpy(), atol=1e-7)
    boxes = [ds.input_boxes(i, (224, 224), 0.9, "tis") for i in range(2)]
    pg = get_metric("pointing_game").fn(None, x, torch.zeros(2, 224, 224), boxes=None, protocol="tis_code",
                                        raw_maps=raw, box_coords=boxes).values.numpy()
    np.testing.assert_array_equal(np.array(vals["pointing_game"], dtype=float), np.where(np.isnan(pg), np.nan, pg))


def test_bench_tis_transform_pixel_space_uses_imagenet_stats(real_model, tmp_path):
    """Under ``--transform tis`` the inputs are ImageNet-normalised, so the ``paper`` protocol's pixel-black
    substrate must be pixel black in *that* normalisation: the last point of the paper deletion curve
    (every pixel deleted) is the label's probability on the constant image -mean/std of ImageNet (slow
    reference built here), not on the model's own -1 (its mean = std = 0.5)."""
    import sqlite3

    from vitlens.bench import BenchConfig, run_bench
    from vitlens.bench.store import decode_f32
    from vitlens.data import ImageNetBoxes
    from vitlens.data.transforms import IMAGENET_MEAN, IMAGENET_STD

    torch.set_num_threads(1)
    data = SHARED / "data" / "imagenet-val-sample"
    mp = {"deletion_black": {"metric": "deletion", "protocol": "paper", "substrate": "black", "n_steps": 2}}
    cfg = BenchConfig(out=str(tmp_path / "b"), model="vit_tiny_patch16_224.augreg_in21k_ft_in1k",
                      weights=str(SHARED / "models"), data=str(data), transform="tis",
                      methods={"rollout": {}}, metrics=list(mp), metric_params=mp, limit=1, batch_size=1,
                      report=False)
    run_bench(cfg)
    con = sqlite3.connect(str(tmp_path / "b" / "results.sqlite"))
    (blob,), = con.execute("SELECT curve FROM results WHERE metric='deletion_black'")
    curve = decode_f32(blob)
    (info,), = con.execute("SELECT model_info FROM runs")
    assert json.loads(info)["mean"] == list(IMAGENET_MEAN) and json.loads(info)["std"] == list(IMAGENET_STD)
    black = (-torch.tensor(IMAGENET_MEAN) / torch.tensor(IMAGENET_STD)).view(1, 3, 1, 1).expand(1, 3, 224, 224)
    label = ImageNetBoxes(data)[0].label
    with torch.no_grad():
        p_black = real_model.forward(black.contiguous()).softmax(-1)[0, label].item()
        p_model_black = real_model.forward(-torch.ones(1, 3, 224, 224)).softmax(-1)[0, label].item()
    assert abs(p_black - p_model_black) > 1e-4  # the two blacks are distinguishable for this image
    # one forward pass of the same constant tensor, float32 softmax: agreement to float32 rounding
    assert abs(float(curve[-1]) - p_black) < 1e-5
