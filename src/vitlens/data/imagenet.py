"""ImageNet validation images with bounding boxes.

Two on-disk layouts are read:

* Kaggle localisation format: ``LOC_val_solution.csv`` (``ImageId,PredictionString`` where the
  string repeats ``synset xmin ymin xmax ymax`` in original pixels) and ``LOC_synset_mapping.txt``
  (``synset description`` per line in class-index order), images in ``images/`` or ``ILSVRC/Data/...``;
* the original per-image XML annotations (``ILSVRC2012_val_XXXXXXXX.xml``, PASCAL VOC style) in an
  annotation folder, with a synset mapping file.

Boxes are mapped through the model's eval transform (resize the short side to ``size / crop_pct``,
centre crop ``size``) onto the input grid, clipped to it; boxes that fall entirely outside the crop
are dropped.
"""
from __future__ import annotations

import csv
import math
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from ..errors import InputError


@dataclass
class ImageNetSample:
    """One validation image: path, class index, synset and boxes (original pixels, x0 y0 x1 y1)."""

    image_id: str
    path: Path
    label: int
    synset: str
    boxes: np.ndarray  # (n, 4) float


def read_synset_mapping(path: Path) -> list[tuple[str, str]]:
    """``[(synset, description), ...]`` in class-index order."""
    if not Path(path).exists():
        raise InputError(f"synset mapping file not found: {path}")
    out = []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            syn, _, desc = line.strip().partition(" ")
            out.append((syn, desc))
    return out


def _find_image(root: Path, image_id: str) -> Optional[Path]:
    for sub in ("images", "ILSVRC/Data/CLS-LOC/val", "val", "."):
        for ext in (".JPEG", ".jpeg", ".jpg", ".png"):
            p = root / sub / f"{image_id}{ext}"
            if p.exists():
                return p
    return None


def _parse_xml(path: Path) -> tuple[list[str], np.ndarray]:
    root = ET.parse(path).getroot()
    syns, boxes = [], []
    for obj in root.iter("object"):
        syns.append(obj.findtext("name"))
        bb = obj.find("bndbox")
        boxes.append([float(bb.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")])
    return syns, np.asarray(boxes, dtype=np.float64).reshape(-1, 4)


class ImageNetBoxes:
    """A folder of ImageNet validation images with boxes (either layout above).

    Args:
        root: the folder (e.g. ``../shared/data/imagenet-val-sample``).
        solution: the localisation CSV (default ``root/LOC_val_solution.csv``).
        annotations: a folder of per-image XML files (used instead of the CSV when given).
        synsets: the synset mapping (default ``root/LOC_synset_mapping.txt``).
    """

    def __init__(self, root, solution=None, annotations=None, synsets=None):
        self.root = Path(root)
        if not self.root.is_dir():
            raise InputError(f"dataset folder not found: {self.root}")
        syn_path = Path(synsets) if synsets else self.root / "LOC_synset_mapping.txt"
        mapping = read_synset_mapping(syn_path)
        self.synsets = [s for s, _ in mapping]
        self.class_names = [d for _, d in mapping]
        index = {s: i for i, s in enumerate(self.synsets)}
        samples: list[ImageNetSample] = []
        if annotations is not None:
            ann = Path(annotations)
            if not ann.is_dir():
                raise InputError(f"annotation folder not found: {ann}")
            for xml in sorted(ann.glob("*.xml")):
                syns, boxes = _parse_xml(xml)
                img = _find_image(self.root, xml.stem)
                if img is None or not syns:
                    continue
                samples.append(ImageNetSample(xml.stem, img, index[syns[0]], syns[0], boxes))
        else:
            sol = Path(solution) if solution else self.root / "LOC_val_solution.csv"
            if not sol.exists():
                raise InputError(f"localisation CSV not found: {sol}")
            with open(sol, newline="") as f:
                for row in csv.DictReader(f):
                    parts = row["PredictionString"].split()
                    if len(parts) % 5:
                        raise InputError(f"malformed PredictionString for {row['ImageId']} in {sol}")
                    syns = parts[0::5]
                    boxes = np.array([[float(v) for v in parts[i + 1:i + 5]] for i in range(0, len(parts), 5)])
                    img = _find_image(self.root, row["ImageId"])
                    if img is None:
                        continue
                    samples.append(ImageNetSample(row["ImageId"], img, index[syns[0]], syns[0], boxes.reshape(-1, 4)))
        samples.sort(key=lambda s: s.image_id)
        if not samples:
            raise InputError(f"no annotated images found in {self.root}")
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> ImageNetSample:
        return self.samples[i]

    def input_boxes(self, i: int, size: tuple[int, int], crop_pct: float, transform: str = "model") -> np.ndarray:
        """Boxes of image ``i`` on the input grid: through the model's eval transform (``"model"``, see
        :func:`transform_boxes`) or the TIS pipeline (``"tis"``, :func:`vitlens.data.transforms.tis_boxes`;
        ``size`` must then be 224 x 224)."""
        from ..models.preprocess import exif_orientation, orient_boxes

        s = self.samples[i]
        # the images are read with their EXIF orientation applied: the boxes (annotated on the stored
        # pixels) follow the same rotation / mirroring
        (w, h), orientation = exif_orientation(s.path)
        boxes = orient_boxes(s.boxes, (w, h), orientation)
        if orientation in (5, 6, 7, 8):
            w, h = h, w
        if transform == "tis":
            from .transforms import TIS_CROP, tis_boxes

            if tuple(size) != TIS_CROP:
                raise InputError(f"the 'tis' transform produces {TIS_CROP} inputs; the model expects {tuple(size)}.")
            return tis_boxes(boxes, (w, h))
        return transform_boxes(boxes, (w, h), size, crop_pct)

    def box_masks(self, indices: Sequence[int], size: tuple[int, int], crop_pct: float,
                  transform: str = "model") -> torch.Tensor:
        """(n, H, W) bool masks: union of each image's boxes on the model's input grid."""
        return torch.stack([boxes_to_mask(self.input_boxes(i, size, crop_pct, transform), size) for i in indices])

    def box_coverage(self, indices: Sequence[int], size: tuple[int, int], crop_pct: float,
                     transform: str = "model") -> torch.Tensor:
        """(n,) exact area fraction of the input grid covered by the union of each image's boxes."""
        return torch.tensor([union_area(self.input_boxes(i, size, crop_pct, transform)) / (size[0] * size[1])
                             for i in indices], dtype=torch.float64)


def transform_boxes(boxes: np.ndarray, image_size: tuple[int, int], size: tuple[int, int],
                    crop_pct: float) -> np.ndarray:
    """Map (n, 4) original-pixel boxes through resize(short side -> size/crop_pct) + centre crop.

    Follows torchvision's ``Resize(int)`` (the short side becomes ``floor(size / crop_pct)``, the long
    side ``int(long * short_new / short)``) and ``CenterCrop`` (offsets ``round((new - crop) / 2)``).
    Returns boxes in input-grid pixels, clipped; boxes with no area left are removed.
    """
    w, h = image_size
    H, W = size
    target = math.floor(H / crop_pct) if H == W else None
    if target is None:
        new_h, new_w = math.floor(H / crop_pct), math.floor(W / crop_pct)
    elif w <= h:
        new_w, new_h = target, int(target * h / w)
    else:
        new_h, new_w = target, int(target * w / h)
    sx, sy = new_w / w, new_h / h
    top = int(round((new_h - H) / 2.0))
    left = int(round((new_w - W) / 2.0))
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4).copy()
    b[:, [0, 2]] = b[:, [0, 2]] * sx - left
    b[:, [1, 3]] = b[:, [1, 3]] * sy - top
    b[:, [0, 2]] = b[:, [0, 2]].clip(0, W)
    b[:, [1, 3]] = b[:, [1, 3]].clip(0, H)
    keep = (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])
    return b[keep]


def union_area(boxes: np.ndarray) -> float:
    """Exact area of the union of (n, 4) axis-aligned boxes (coordinate compression)."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if len(b) == 0:
        return 0.0
    xs = np.unique(b[:, [0, 2]])
    ys = np.unique(b[:, [1, 3]])
    cx = (xs[:-1] + xs[1:]) / 2
    cy = (ys[:-1] + ys[1:]) / 2
    inside = np.zeros((len(cy), len(cx)), dtype=bool)
    for x0, y0, x1, y1 in b:
        inside |= ((cx >= x0) & (cx <= x1))[None, :] & ((cy >= y0) & (cy <= y1))[:, None]
    return float((inside * np.diff(ys)[:, None] * np.diff(xs)[None, :]).sum())


def boxes_to_mask(boxes: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """(H, W) bool mask of the union of boxes; a pixel (i, j) is inside when its centre
    (j + 0.5, i + 0.5) lies inside a box."""
    H, W = size
    ys = torch.arange(H, dtype=torch.float64)[:, None] + 0.5
    xs = torch.arange(W, dtype=torch.float64)[None, :] + 0.5
    m = torch.zeros(H, W, dtype=torch.bool)
    for x0, y0, x1, y1 in np.asarray(boxes).reshape(-1, 4):
        m |= (xs >= x0) & (xs <= x1) & (ys >= y0) & (ys <= y1)
    return m


def load_imagenet_boxes(root, **kwargs) -> ImageNetBoxes:
    """Shorthand for :class:`ImageNetBoxes`."""
    return ImageNetBoxes(root, **kwargs)
