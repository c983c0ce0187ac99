"""OpenImages V7 point-level labels (the official release's CSV format), for the open-vocabulary p-mIoU.

Files (as distributed):

* point labels, e.g. ``oidv7-val-annotations-point-labels.csv`` with the header
  ``ImageId,X,Y,Label,EstimatedYesNo,Source,YesVotes,NoVotes,UnsureVotes,TextLabel``; X and Y are
  relative coordinates in [0, 1] of the original image, ``Label`` a MID (``/m/...``) and
  ``EstimatedYesNo`` one of ``yes``, ``no``, ``unsure`` (unsure points are dropped);
* class descriptions ``oidv7-class-descriptions.csv`` (``LabelName,DisplayName``);
* images ``<ImageId>.jpg`` in an image folder.

Points follow the model's eval transform (resize the short side to size / crop_pct, centre crop) like
boxes; points outside the crop are dropped.

Which (image, class) pairs are evaluated: by default the classes *present* in the image, i.e. with at
least one *yes* point (each explained with the prompt ``"a photo of a {class}"``); its *no* points
still count as negatives. ``present_only=False`` also keeps classes annotated only with *no* points
(verified absent), whose maps can then only add false positives.
"""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import InputError

PROMPT = "a photo of a {}"


@dataclass
class PointPair:
    """One (image, class) pair: the image path, the class name and its points (relative x, y) + yes/no."""

    image_id: str
    path: Path
    label: str
    name: str
    points: np.ndarray  # (n, 2) relative (x, y)
    positive: np.ndarray  # (n,) bool


def transform_points(points: np.ndarray, image_size: tuple[int, int], size: tuple[int, int],
                     crop_pct: float) -> tuple[np.ndarray, np.ndarray]:
    """Relative (x, y) points -> input-grid pixel coordinates; returns (points, inside-the-crop mask)."""
    w, h = image_size
    H, W = size
    if H == W:
        t = math.floor(H / crop_pct)
        new_w, new_h = (t, int(t * h / w)) if w <= h else (int(t * w / h), t)
    else:
        new_h, new_w = math.floor(H / crop_pct), math.floor(W / crop_pct)
    top = int(round((new_h - H) / 2.0))
    left = int(round((new_w - W) / 2.0))
    p = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    out = np.stack([p[:, 0] * new_w - left, p[:, 1] * new_h - top], 1)
    inside = (out[:, 0] >= 0) & (out[:, 0] < W) & (out[:, 1] >= 0) & (out[:, 1] < H)
    return out, inside


class OpenImagesPoints:
    """(image, class) pairs with point labels. ``classes`` maps MIDs to display names."""

    def __init__(self, points_csv, images, classes_csv, present_only: bool = True):
        self.images = Path(images)
        for p in (Path(points_csv), Path(classes_csv)):
            if not p.exists():
                raise InputError(f"OpenImages file not found: {p}")
        if not self.images.is_dir():
            raise InputError(f"OpenImages image folder not found: {self.images}")
        with open(classes_csv, newline="") as f:
            self.class_names = {r["LabelName"]: r["DisplayName"] for r in csv.DictReader(f)}
        groups: dict = {}
        with open(points_csv, newline="") as f:
            reader = csv.DictReader(f)
            need = {"ImageId", "X", "Y", "Label", "EstimatedYesNo"}
            if not need <= set(reader.fieldnames or []):
                raise InputError(f"{points_csv} lacks the point-label columns {sorted(need)}.")
            for r in reader:
                yn = r["EstimatedYesNo"].strip().lower()
                if yn not in ("yes", "no"):
                    continue
                groups.setdefault((r["ImageId"], r["Label"]), []).append((float(r["X"]), float(r["Y"]), yn == "yes"))
        pairs = []
        for (iid, mid), pts in sorted(groups.items()):
            path = self.images / f"{iid}.jpg"
            if not path.exists() or mid not in self.class_names:
                continue
            arr = np.array(pts, dtype=np.float64)
            if present_only and not (arr[:, 2] > 0).any():
                continue
            pairs.append(PointPair(iid, path, mid, self.class_names[mid], arr[:, :2], arr[:, 2] > 0))
        if not pairs:
            raise InputError(f"no labelled (image, class) pairs with images found from {points_csv}.")
        self.pairs = pairs

    def __len__(self) -> int:
        return len(self.pairs)

    @staticmethod
    def prompt(name: str) -> str:
        return PROMPT.format(name.lower())

    def batch(self, indices, model) -> tuple[torch.Tensor, list[str], torch.Tensor, torch.Tensor]:
        """``(x, prompts, points (n, P, 2), point_labels (n, P))`` on the model's input grid; padded with -1."""
        pairs = [self.pairs[i] for i in indices]
        x = model.preprocess([p.path for p in pairs])
        points, labels = self.points_for(indices, model.input_size, model.crop_pct)
        return x, [self.prompt(p.name) for p in pairs], points, labels

    def points_for(self, indices, size: tuple[int, int], crop_pct: float) -> tuple[torch.Tensor, torch.Tensor]:
        """``(points (n, P, 2), point_labels (n, P))`` of pairs ``indices`` on the input grid of an eval
        transform with ``size`` and ``crop_pct``; padded with label -1."""
        from PIL import Image

        pairs = [self.pairs[i] for i in indices]
        pts, labs = [], []
        for p in pairs:
            with Image.open(p.path) as im:
                im_size = im.size
            q, inside = transform_points(p.points, im_size, size, crop_pct)
            pts.append(q[inside])
            labs.append(p.positive[inside].astype(np.int64))
        P = max(1, max(len(q) for q in pts))
        points = torch.zeros(len(pairs), P, 2, dtype=torch.float64)
        labels = torch.full((len(pairs), P), -1, dtype=torch.long)
        for i, (q, lb) in enumerate(zip(pts, labs)):
            points[i, :len(q)] = torch.from_numpy(q)
            labels[i, :len(lb)] = torch.from_numpy(lb)
        return points, labels
