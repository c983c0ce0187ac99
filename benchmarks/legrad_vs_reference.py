"""vitlens' LeGrad against the released ``legrad-torch`` package (WalBouss/LeGrad 1.1) on the same
randomly initialised open_clip ViT-B/16 and the same prompts.

The state dict of one seeded random ``open_clip.create_model("ViT-B-16")`` is saved once and loaded by
both sides (two separate model instances; ``legrad.LeWrapper`` patches the forward of its own copy).
Images: the first ``--images`` shared ImageNet images (``../shared``), open_clip's eval transform;
prompt "a photo of a {class}" with the image's ground-truth class name. Per image and configuration
the Pearson correlation between the two 224x224 maps (both min-max normalised, both upsampled
bilinearly from the 14x14 token grid) is printed, then the mean / min over images.

Configurations:

* ``released-vs-released``: legrad-torch default (``LeWrapper(model)``, ``layer_index=-2``) vs vitlens
  ``layers=2, pooling="released"`` -- should agree to float precision;
* ``released-vs-vitlens-default``: legrad-torch default vs vitlens' defaults (``layers=0.4``, the
  last 40 %: 5 of 12 blocks; ``pooling="auto"`` = released token mean);
* ``last5-vs-vitlens-default``: legrad-torch with ``layer_index=-5`` vs vitlens' defaults (same
  layers: isolates the layer choice).

The package is NOT a vitlens dependency: install it, einops and the open_clip it pins
(``open_clip_torch<=2.23.0``) into a separate folder and put it on PYTHONPATH for this script only (both
sides then run on open_clip 2.23). With open_clip 3.x the package is silently wrong: its patched
``VisionTransformer.forward`` feeds the blocks sequence-first tensors, but the un-hooked blocks of open_clip
3.x attend batch-first, so every block below ``layer_index`` mixes the wrong axis (we measured map
correlations of 0.2-0.5 with vitlens' identical configuration). Its ``utils.py`` imports OpenCV for
visualisation, which this script stubs (no OpenCV code runs):

    pip install --target /tmp/legrad_site --no-deps /tmp/legradpkg/legrad_torch-1.1-py3-none-any.whl einops \
        "open_clip_torch==2.23.0"
    PYTHONPATH=src:/tmp/legrad_site python benchmarks/legrad_vs_reference.py --images 8
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _shared import REPO, SHARED  # noqa: E402


def _import_legrad():
    if "cv2" not in sys.modules:  # only used by legrad.utils.visualize
        sys.modules["cv2"] = types.ModuleType("cv2")
    with contextlib.redirect_stdout(io.StringIO()):
        import legrad  # noqa: F401
    return sys.modules["legrad"]


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten().double(), b.flatten().double()
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()).clamp_min(1e-30))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "legrad_vs_reference.json"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import open_clip

    import vitlens
    from vitlens.data import ImageNetBoxes

    legrad = _import_legrad()
    ver = getattr(open_clip, "__version__", None) or __import__("open_clip.version").version.__version__
    if tuple(int(p) for p in ver.split(".")[:2]) > (2, 23):
        print(f"warning: open_clip {ver} > 2.23: legrad-torch 1.1 is not compatible (see the docstring)", file=sys.stderr)
    torch.manual_seed(args.seed)
    base = open_clip.create_model("ViT-B-16", pretrained=None).eval()
    ckpt = Path(tempfile.mkdtemp()) / "vitb16_random.pt"
    torch.save(base.state_dict(), ckpt)
    del base

    def fresh():
        m = open_clip.create_model("ViT-B-16", pretrained=None)
        m.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=True))
        return m.eval()

    tok = open_clip.get_tokenizer("ViT-B-16")
    ours = vitlens.wrap_model(fresh(), tokenizer=tok)
    refs = {}
    with contextlib.redirect_stdout(io.StringIO()):
        refs[-2] = legrad.LeWrapper(fresh())  # the package default
        refs[-5] = legrad.LeWrapper(fresh(), layer_index=-5)

    ds = ImageNetBoxes(SHARED / "data" / "imagenet-val-sample")
    from timm.data import ImageNetInfo

    info = ImageNetInfo("imagenet-1k")
    configs = {"released-vs-released": (-2, dict(layers=2, pooling="released")),
               "released-vs-vitlens-default": (-2, {}),
               "last5-vs-vitlens-default": (-5, {})}
    rows = {k: [] for k in configs}
    for i in range(args.images):
        item = ds[i]
        cname = info.index_to_description(item.label).split(",")[0]
        prompt = f"a photo of a {cname}"
        x = ours.preprocess([item.path])
        text = refs[-2].encode_text(tok([prompt]), normalize=True)
        ref_maps = {}
        for li, wrapper in refs.items():
            ref_maps[li] = wrapper.compute_legrad_clip(image=x, text_embedding=text).detach()[0, 0]
        for key, (li, params) in configs.items():
            ex = vitlens.explain(ours, x, "legrad", target=prompt, progress=False, **params)
            rows[key].append(_corr(ex.maps[0], ref_maps[li]))
        print(json.dumps({"image": i, "prompt": prompt, **{k: round(v[-1], 6) for k, v in rows.items()}}), flush=True)
    summary = {k: dict(mean=sum(v) / len(v), min=min(v), per_image=v) for k, v in rows.items()}
    summary["images"] = args.images
    summary["model"] = "open_clip ViT-B-16, random init (seed %d)" % args.seed
    print(json.dumps({k: (dict(mean=round(v["mean"], 6), min=round(v["min"], 6)) if isinstance(v, dict) else v)
                      for k, v in summary.items()}))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
