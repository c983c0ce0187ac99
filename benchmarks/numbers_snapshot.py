"""Every method's map and every metric's value on the 4 built-in images with the default model, saved to
an ``.npz`` (``--save``) or compared with a saved one (``--compare``): the "no number changes" check of a
refactor (issue 19).

    python benchmarks/numbers_snapshot.py --save /tmp/before.npz
    ... refactor ...
    python benchmarks/numbers_snapshot.py --compare /tmp/before.npz

Methods run with ``vitlens demo``'s settings (``cli.DEMO_PARAMS``: lighter RISE, occlusion, IG and
SmoothGrad), seed 0, fp32, predicted class. Metrics run on the maps of ``legrad``, ``rollout`` and
``tis`` with synthetic ground truth derived from the image size (a centre box, its mask, two points),
since the built-in images have none. ``--compare`` prints, per array, whether it is bit-identical and
else the largest absolute difference; exit status 1 when any array differs by more than ``--atol``.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

DEMO_PARAMS = {
    "rise": {"n_masks": 500},
    "occlusion": {"window": 32, "stride": 32},
    "integrated_gradients": {"n_steps": 16},
    "smoothgrad": {"n_samples": 16},
}
METRIC_METHODS = ("legrad", "rollout", "tis")


def snapshot() -> dict[str, np.ndarray]:
    import vitlens
    from vitlens.data.samples import sample_images
    from vitlens.metrics import (
        deletion,
        grid_pointing_game,
        insertion,
        max_sensitivity,
        open_vocab,
        perturbation_negative,
        perturbation_positive,
        pointing_game,
        segmentation,
        sparseness,
    )

    from _shared import shared_model

    torch.set_num_threads(int(os.environ.get("SNAPSHOT_THREADS", "2")))
    model = shared_model()
    x = model.preprocess(list(sample_images().values()))
    B, _, H, W = x.shape
    out: dict[str, np.ndarray] = {"x": x.numpy()}
    exps = {}
    names = [n for n in vitlens.methods() if n != "textspan"]  # textspan needs a text model
    if os.environ.get("SNAPSHOT_QUICK"):  # a quick check of this script itself
        names = ["legrad", "rollout", "tis"]
    for name in names:
        exp = vitlens.explain(model, x, name, seed=0, progress=False, **DEMO_PARAMS.get(name, {}))
        exps[name] = exp
        out[f"map/{name}"] = exp.maps.numpy()
        if exp.token_maps is not None:
            out[f"token_map/{name}"] = exp.token_maps.numpy()
        out[f"target/{name}"] = exp.targets.numpy()
        raw = vitlens.explain(model, x, name, seed=0, progress=False, normalise=False, **DEMO_PARAMS.get(name, {}))
        out[f"raw/{name}"] = (raw.token_maps if raw.token_maps is not None else raw.maps).numpy()
    box = torch.zeros(B, H, W, dtype=torch.bool)
    box[:, H // 4: 3 * H // 4, W // 3: 2 * W // 3] = True
    coords = [[(W // 3, H // 4, 2 * W // 3, 3 * H // 4)] for _ in range(B)]
    cells = torch.arange(B) % 4  # the grid cell holding each map's target
    points = torch.tensor([[[H // 2, W // 2], [5, 5]]] * B)
    point_labels = torch.tensor([[1, 0]] * B)
    for name in METRIC_METHODS:
        exp = exps[name]
        m, t = exp.maps, exp.targets
        raw = out[f"raw/{name}"]
        runs = {
            "insertion_blur": lambda: insertion(model, x, m, t, substrate="blur", progress=False),
            "deletion_blur": lambda: deletion(model, x, m, t, substrate="blur", progress=False),
            "insertion_black": lambda: insertion(model, x, m, t, substrate="black", progress=False),
            "deletion_rise_code": lambda: deletion(model, x, m, t, protocol="rise_code", progress=False),
            "insertion_tis_code": lambda: insertion(model, x, m, t, protocol="tis_code", substrate="random",
                                                    raw_maps=torch.from_numpy(raw), progress=False),
            "perturbation_positive": lambda: perturbation_positive(model, x, m, t, labels=t, progress=False),
            "perturbation_negative": lambda: perturbation_negative(model, x, m, t, labels=t, progress=False),
            "pointing_game": lambda: pointing_game(model, x, m, t, boxes=box, max_box_fraction=None),
            "pointing_energy": lambda: pointing_game(model, x, m, t, boxes=box, variant="energy",
                                                     max_box_fraction=None),
            "pointing_tis_code": lambda: pointing_game(model, x, m, t, boxes=box, protocol="tis_code",
                                                       box_coords=coords, raw_maps=torch.from_numpy(raw)),
            "grid_pointing_game": lambda: grid_pointing_game(model, x, m, t, cells=cells),
            "segmentation": lambda: segmentation(model, x, m, t, masks=box),
            "open_vocab": lambda: open_vocab(model, x, m, t, points=points, point_labels=point_labels),
            "sparseness": lambda: sparseness(model, x, m, t),
            "sparseness_tis_code": lambda: sparseness(model, x, m, t, protocol="tis_code",
                                                      raw_maps=torch.from_numpy(raw)),
        }
        if name != "tis":  # (re-runs the method per sample: TIS would take minutes)
            runs["max_sensitivity"] = lambda: max_sensitivity(model, x, m, t, method=name, n_samples=2,
                                                              progress=False)
        for metric, fn in runs.items():
            res = fn()
            out[f"metric/{name}/{metric}"] = res.values.float().numpy()
            if res.curves is not None:
                out[f"curve/{name}/{metric}"] = res.curves.float().numpy()
            for k, v in (res.extras or {}).items():
                if isinstance(v, torch.Tensor):
                    out[f"extra/{name}/{metric}/{k}"] = v.float().numpy()
    return out


def compare(before: dict, after: dict, atol: float) -> int:
    bad = 0
    identical = 0
    for k in sorted(set(before) | set(after)):
        if k not in after or k not in before:
            print(f"{k}: only in {'before' if k in before else 'after'}")
            bad += 1
            continue
        a, b = before[k], after[k]
        if a.shape != b.shape:
            print(f"{k}: shape {a.shape} -> {b.shape}")
            bad += 1
            continue
        if np.array_equal(a, b, equal_nan=True):
            identical += 1
            continue
        d = float(np.nanmax(np.abs(a.astype(np.float64) - b.astype(np.float64))))
        print(f"{k}: max |diff| = {d:.3g}")
        bad += d > atol
    print(f"{identical} of {len(before)} arrays bit-identical; {bad} beyond atol={atol}")
    return 1 if bad else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--save")
    g.add_argument("--compare")
    p.add_argument("--atol", type=float, default=0.0)
    a = p.parse_args()
    snap = snapshot()
    if a.save:
        np.savez_compressed(a.save, **snap)
        print(f"saved {len(snap)} arrays to {a.save}")
        return 0
    before = dict(np.load(a.compare))
    return compare(before, snap, a.atol)


if __name__ == "__main__":
    sys.exit(main())
