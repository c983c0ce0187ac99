"""The datasets ``vitlens bench --data`` reads, detected from the path (or named with ``--dataset``).

=================  ===========================================================  ===============================
kind               what ``--data`` points at                                    data the metrics get
=================  ===========================================================  ===============================
``imagenet``       ImageNet validation folder: ``LOC_val_solution.csv``,        ``boxes``, ``coverage``,
                   ``LOC_synset_mapping.txt``, images (:class:`ImageNetBoxes`)  ``labels`` (ground truth)
``imagenet-seg``   ImageNet-Segmentation: ``gtsegs_ijcv.mat`` or a folder       ``masks``
                   holding it (:class:`ImageNetSegmentation`)
``openimages``     OpenImages V7 points: a folder with the point-label CSV      ``points``, ``point_labels``
                   (``...point-labels.csv``), the class descriptions CSV
                   (``LabelName,DisplayName``) and the images (``images/``,
                   ``validation/``, ``val/`` or the folder itself)
``folder``         any folder of images (no ground truth)                       nothing
=================  ===========================================================  ===============================

Detection, in order: a ``.mat`` file or a folder with ``gtsegs_ijcv.mat`` -> ``imagenet-seg``; a folder
with ``LOC_val_solution.csv`` -> ``imagenet``; a folder with a CSV whose header has ``EstimatedYesNo``
-> ``openimages``; any other folder -> ``folder``.

What is explained (the stored map's target):

* ``imagenet``: the ground-truth class (``--target label``) or the model's top-1 class (``predicted``);
* ``imagenet-seg``: the predicted class (the file has no class labels; Chefer et al.'s
  ``imagenet_seg_eval.py`` explains the top class too); ``--target label`` is refused;
* ``openimages``: one item per (image, class present in the image), image id ``<ImageId>:<MID>``,
  explained with the text prompt ``"a photo of a {class}"`` (:data:`vitlens.data.openimages.PROMPT`)
  whatever ``--target`` says; the map is stored under the pair's id with the class index (position
  of the MID in the class-description file) as its target, so every (image, class) map is computed
  once and reused by every metric and every resumed run (``--limit N`` counts pairs). Needs a
  CLIP-style model.

Images: ``imagenet``, ``openimages`` and ``folder`` use the model's eval transform (resize, centre
crop; boxes and points follow it); ``imagenet-seg`` resizes to the input size without cropping,
masks with nearest-neighbour interpolation, as ``imagenet_seg_eval.py``.

CLIP-style models without a class vocabulary get ImageNet's as zero-shot classes (open_clip's
``IMAGENET_CLASSNAMES``, else timm's WordNet names; one prompt ``"a photo of a {}."``; a folder whose
synset mapping is not the 1000 classes gives its own names) on ``imagenet`` and ``imagenet-seg``, so
the predicted class and the perturbation metrics' top-1 correctness are defined.

Images are decoded by :func:`load_images` (the model's eval transform, or the TIS pipeline with
``--transform tis``).

Metrics per dataset: a config's ``metrics`` may be a list (used on any dataset) or a dict from
dataset kind to list (as the LeGrad presets, whose tables use three datasets); see
:func:`metrics_for`.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from ..errors import InputError

KINDS = ("imagenet", "imagenet-seg", "openimages", "folder")
SEG_FILE = "gtsegs_ijcv.mat"
IMAGE_EXTS = (".jpeg", ".jpg", ".png", ".bmp", ".webp")
ZERO_SHOT_TEMPLATE = "a photo of a {}."


@dataclass
class Item:
    """One unit of the benchmark: one stored map per (method entry, item)."""

    image_id: str
    path: Path
    label: int          # -1 when unknown
    synset: str
    index: int          # index in the underlying dataset (-1 for a plain folder)


# --------------------------------------------------------------------------------------------- detection
def detect(path: str) -> str:
    """The dataset kind of ``path`` (see the module docstring)."""
    p = Path(path)
    if p.is_file():
        if p.suffix.lower() == ".mat":
            return "imagenet-seg"
        raise InputError(f"--data {p} is a file; give a folder (or an ImageNet-Segmentation .mat file).")
    if not p.is_dir():
        raise InputError(f"data folder not found: {p}")
    if (p / SEG_FILE).is_file():
        return "imagenet-seg"
    if (p / "LOC_val_solution.csv").exists():
        return "imagenet"
    if _point_csvs(p):
        return "openimages"
    return "folder"


def open_dataset(path: Optional[str], kind: Optional[str] = None):
    """The bench dataset at ``path``; ``kind`` (``--dataset``) overrides detection."""
    if not path:
        raise InputError("no data folder given (--data DIR).")
    if kind is not None and kind not in KINDS:
        raise InputError(f"unknown dataset kind '{kind}'; choose one of {', '.join(KINDS)}.")
    kind = kind or detect(path)
    cls = {"imagenet": ImageNetData, "imagenet-seg": SegmentationData, "openimages": OpenImagesData,
           "folder": FolderData}[kind]
    return cls(path)


def metrics_for(metrics: Any, kind: str) -> list[str]:
    """``metrics`` as a list for dataset ``kind``: a list is used as is; a dict maps kinds to lists."""
    if isinstance(metrics, dict):
        if kind not in metrics:
            raise InputError(f"the configuration lists metrics for the datasets {', '.join(sorted(metrics))}; "
                             f"--data is a '{kind}' dataset (give --metrics, or data of one of those kinds).")
        metrics = metrics[kind]
    if isinstance(metrics, str):
        metrics = [m.strip() for m in metrics.split(",") if m.strip()]
    return list(metrics)


def _point_csvs(root: Path) -> list[Path]:
    out = []
    for f in sorted(root.glob("*.csv")):
        try:
            with open(f, newline="") as fh:
                head = fh.readline()
        except OSError:
            continue
        if "EstimatedYesNo" in head and "ImageId" in head:
            out.append(f)
    return out


def _zero_shot_vocabulary(model, names: Optional[Sequence[str]] = None) -> None:
    """Give a CLIP-style model without classes ImageNet's class names as its zero-shot vocabulary."""
    if not getattr(model, "supports_text", False) or model.num_classes is not None or not hasattr(model, "set_classes"):
        return
    if names is None:
        try:  # CLIP's curated ImageNet class names
            from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES as names
        except ImportError:  # e.g. a Hugging Face CLIP without open_clip installed: WordNet's first lemma
            from timm.data import ImageNetInfo

            info = ImageNetInfo()
            names = [info.index_to_description(i).split(",")[0].strip() for i in range(1000)]
    model.set_classes(list(names), ZERO_SHOT_TEMPLATE)


def load_images(model, paths: list, transform: str = "model") -> torch.Tensor:
    """The model's own eval transform; the generic one (resize short side to size/crop_pct, centre crop)
    when the former does not produce the model's input size (e.g. timm models built with ``img_size``).
    ``transform="tis"``: the TIS evaluation pipeline (:mod:`vitlens.data.transforms`)."""
    if transform == "tis":
        from ..data.transforms import tis_images

        x = tis_images(paths).to(model.device)
        if tuple(x.shape[-2:]) != tuple(model.input_size):
            raise InputError(f"the 'tis' transform produces 224 x 224 inputs; the model expects {model.input_size}.")
        return x
    x = model.preprocess(paths)
    if tuple(x.shape[-2:]) != tuple(model.input_size):
        from ..models.preprocess import preprocess_images

        x = preprocess_images(paths, size=model.input_size, mean=model.mean, std=model.std, crop_pct=model.crop_pct,
                              interpolation=getattr(model, "interpolation", "bicubic")).to(model.device)
    return x


def _predicted(model, x: torch.Tensor) -> list[int]:
    with torch.no_grad():
        return model.class_logits(model.forward(x)).argmax(-1).tolist()


# ------------------------------------------------------------------------------------------- datasets
class BenchDataset:
    """What the runner needs from a dataset (subclasses fill it in)."""

    kind = "folder"
    boxes = None  # ImageNetBoxes for ``imagenet`` (``--max-box-fraction``)
    provides: tuple = ()  # the keys of data_for()
    transform = "model"  # data pipeline set by the runner: "model" or "tis" (vitlens.data.transforms)

    def check_metrics(self, metrics) -> None:
        """A clear error, before any model is loaded, for a metric whose ground truth this dataset lacks."""
        for m in metrics:
            missing = [k for k in m.needs if k not in self.provides]
            if missing:
                kinds = [c.kind for c in (ImageNetData, SegmentationData, OpenImagesData) if set(m.needs) <= set(c.provides)]
                raise InputError(f"metric '{m.name}' needs {', '.join(missing)}, which the {self.describe()} does not "
                                 f"provide; it runs on: {', '.join(kinds) or 'no bench dataset'}.")

    def __init__(self, root: str):
        self.root = Path(root)
        self.items: list[Item] = []

    def describe(self) -> str:
        return f"{self.kind} dataset {self.root}"

    def coverage(self, items: list[Item], size, crop_pct) -> np.ndarray:
        """Per item, the fraction of the input covered by its boxes (NaN without boxes)."""
        return np.full(len(items), np.nan)

    def data_for(self, items: list[Item], size, crop_pct) -> dict:
        """Per-item ground truth for the metrics (keys of ``metrics_bridge.DATA_KWARGS``)."""
        return {}

    def prepare_model(self, model) -> None:
        """Adjust the loaded model to the dataset (e.g. a zero-shot vocabulary); default: nothing."""

    def load(self, model, items: list[Item]) -> torch.Tensor:
        """The (n, 3, H, W) model inputs of ``items``."""
        return load_images(model, [it.path for it in items], self.transform)

    def targets(self, rule: str, model, items: list[Item], x: torch.Tensor) -> tuple[list, Optional[list[int]]]:
        """``(what explain() gets, what the store keeps or None for the explained class indices)``."""
        if rule == "label":
            if any(it.label < 0 for it in items):
                raise InputError(f"the {self.describe()} has no class labels: use --target predicted.")
            return [it.label for it in items], None
        return _predicted(model, x), None


class FolderData(BenchDataset):
    """A plain folder of images: no labels, no ground truth."""

    kind = "folder"

    def __init__(self, root: str):
        super().__init__(root)
        if not self.root.is_dir():
            raise InputError(f"data folder not found: {self.root}")
        files = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_EXTS)
        if not files:
            raise InputError(f"no images ({', '.join(IMAGE_EXTS)}) found in {self.root}")
        self.items = [Item(str(p.relative_to(self.root).with_suffix("")), p, -1, "", -1) for p in files]


class ImageNetData(BenchDataset):
    """ImageNet validation images with boxes and labels (:class:`vitlens.data.ImageNetBoxes`)."""

    kind = "imagenet"
    provides = ("boxes", "coverage", "labels")

    def __init__(self, root: str):
        from ..data import ImageNetBoxes

        super().__init__(root)
        self.boxes = ImageNetBoxes(self.root)
        self.items = [Item(s.image_id, s.path, s.label, s.synset, i) for i, s in enumerate(self.boxes.samples)]

    def coverage(self, items: list[Item], size, crop_pct) -> np.ndarray:
        return self.boxes.box_coverage([it.index for it in items], size, crop_pct, self.transform).numpy()

    def data_for(self, items: list[Item], size, crop_pct) -> dict:
        idx = [it.index for it in items]
        return dict(boxes=self.boxes.box_masks(idx, size, crop_pct, self.transform),
                    coverage=self.boxes.box_coverage(idx, size, crop_pct, self.transform).float(),
                    box_coords=[self.boxes.input_boxes(i, size, crop_pct, self.transform) for i in idx],
                    labels=torch.tensor([it.label for it in items], dtype=torch.long))

    def prepare_model(self, model) -> None:
        names = None
        if len(self.boxes.class_names) != 1000:  # not the standard 1000 classes: the folder's own names
            names = [d.split(",")[0].strip() for d in self.boxes.class_names]
        _zero_shot_vocabulary(model, names)


class SegmentationData(BenchDataset):
    """ImageNet-Segmentation (``gtsegs_ijcv.mat``): items ``seg00000`` ... in file order."""

    kind = "imagenet-seg"
    provides = ("masks",)

    def __init__(self, root: str):
        from ..data import ImageNetSegmentation

        super().__init__(root)
        path = self.root / SEG_FILE if self.root.is_dir() else self.root
        self.seg = ImageNetSegmentation(path)
        self.items = [Item(f"seg{i:05d}", path, -1, "", i) for i in range(len(self.seg))]

    def describe(self) -> str:
        return f"ImageNet-Segmentation file {self.seg.path}"

    def load(self, model, items: list[Item]) -> torch.Tensor:
        x = self.seg.images([it.index for it in items], model.input_size, model.mean, model.std)
        return x.to(model.device)

    def data_for(self, items: list[Item], size, crop_pct) -> dict:
        return dict(masks=self.seg.masks([it.index for it in items], tuple(size)))

    def prepare_model(self, model) -> None:
        _zero_shot_vocabulary(model)

    def targets(self, rule: str, model, items: list[Item], x: torch.Tensor) -> tuple[list, Optional[list[int]]]:
        if rule == "label":
            raise InputError("ImageNet-Segmentation has no class labels: use --target predicted (the class the "
                             "model predicts is explained, as in Chefer et al.'s imagenet_seg_eval.py).")
        return super().targets(rule, model, items, x)


class OpenImagesData(BenchDataset):
    """OpenImages V7 point labels: one item per (image, class present), explained with a text prompt."""

    kind = "openimages"
    provides = ("points", "point_labels")

    def __init__(self, root: str):
        from ..data import OpenImagesPoints

        super().__init__(root)
        points = _point_csvs(self.root)
        if len(points) != 1:
            raise InputError(f"{self.root} must hold exactly one OpenImages point-label CSV (header with ImageId, "
                             f"X, Y, Label, EstimatedYesNo); found {len(points)}.")
        classes = []
        for f in sorted(self.root.glob("*.csv")):
            with open(f, newline="") as fh:
                if fh.readline().strip().replace('"', "").startswith("LabelName,DisplayName"):
                    classes.append(f)
        if len(classes) != 1:
            raise InputError(f"{self.root} must hold exactly one OpenImages class-description CSV (header "
                             f"LabelName,DisplayName); found {len(classes)}.")
        images = next((d for d in (self.root / "images", self.root / "validation", self.root / "val")
                       if d.is_dir()), self.root)
        self.points = OpenImagesPoints(points[0], images, classes[0])
        with open(classes[0], newline="") as fh:
            self.class_index = {r["LabelName"]: i for i, r in enumerate(csv.DictReader(fh))}
        self.items = [Item(f"{p.image_id}:{p.label}", p.path, self.class_index[p.label], p.name, i)
                      for i, p in enumerate(self.points.pairs)]

    def data_for(self, items: list[Item], size, crop_pct) -> dict:
        pts, labs = self.points.points_for([it.index for it in items], tuple(size), crop_pct)
        return dict(points=pts, point_labels=labs)

    def targets(self, rule: str, model, items: list[Item], x: torch.Tensor) -> tuple[list, Optional[list[int]]]:
        if not getattr(model, "supports_text", False):
            raise InputError("OpenImages open-vocabulary evaluation explains text prompts (\"a photo of a "
                             f"{{class}}\"): it needs a CLIP-style model, not {model.describe()}.")
        prompts = [self.points.prompt(self.points.pairs[it.index].name) for it in items]
        return prompts, [it.label for it in items]
