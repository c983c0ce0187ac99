"""Named data pipelines for the benchmark: ``"model"`` (the model's own eval transform, the default) and
``"tis"`` (the TIS authors' evaluation pipeline).

``"tis"`` follows ``config/transform/ilsvrc2012_albumentations.yaml`` of aenglebert/Transformer_Input_Sampling
(the ``transform`` default of ``config/evaluate.yaml`` and ``config/generate.yaml``), in its order:

1. ``albumentations.Normalize`` with the ImageNet mean (0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225)
   on the RGB uint8 image: ``(v / 255 - mean) / std`` (whatever the model's own normalisation is: the
   TIS ViT-B/16 was trained with mean = std = 0.5, and TIS feeds it ImageNet-normalised inputs);
2. ``albumentations.Resize(256, 256)``: both sides to 256, the aspect ratio *not* kept, bilinear
   (OpenCV ``INTER_LINEAR``, no antialiasing) on the normalised float image; computed here with
   ``F.interpolate(mode="bilinear", align_corners=False, antialias=False)``, the same half-pixel
   sampling (``src = (dst + 0.5) * in / out - 0.5``, clamped at the borders);
3. ``albumentations.CenterCrop(224, 224)``: rows/columns ``(256 - 224) // 2 = 16`` .. 240;
4. ``ToTensorV2``: HWC -> CHW.

Boxes (``BboxParams(format="pascal_voc")``) go through the same geometry: ``x * 256 / w - 16``,
``y * 256 / h - 16``, clipped to [0, 224]; boxes with no area left are dropped (albumentations'
``filter_bboxes`` with ``min_area = 0``).
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InputError

TRANSFORMS = ("model", "tis")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TIS_RESIZE = (256, 256)
TIS_CROP = (224, 224)


def check_transform(name: str) -> str:
    if name not in TRANSFORMS:
        raise InputError(f"unknown transform '{name}'; choose one of {', '.join(TRANSFORMS)}.")
    return name


def _crop_offsets(resize: Sequence[int] = TIS_RESIZE, crop: Sequence[int] = TIS_CROP) -> tuple[int, int]:
    return (int(resize[0]) - int(crop[0])) // 2, (int(resize[1]) - int(crop[1])) // 2


def tis_image(image) -> torch.Tensor:
    """One image (path, PIL image or array) -> (3, 224, 224) float32 tensor by the TIS pipeline."""
    from ..models.preprocess import load_image

    a = np.asarray(load_image(image), dtype=np.float32)  # (h, w, 3) RGB
    t = torch.from_numpy(a).permute(2, 0, 1)
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(3, 1, 1)
    t = (t / 255.0 - mean) / std
    t = F.interpolate(t[None], size=TIS_RESIZE, mode="bilinear", align_corners=False, antialias=False)[0]
    top, left = _crop_offsets()
    return t[:, top:top + TIS_CROP[0], left:left + TIS_CROP[1]].contiguous()


def tis_images(images: Iterable) -> torch.Tensor:
    """A (B, 3, 224, 224) batch by the TIS pipeline. These inputs are ImageNet-normalised whatever the
    model was trained with: call ``adapter.set_input_normalisation(IMAGENET_MEAN, IMAGENET_STD)`` before
    metrics that work in pixel space (the ``paper`` substrates) or overlays (``vitlens bench
    --transform tis`` does)."""
    images = list(images)
    if not images:
        raise InputError("no images given.")
    return torch.stack([tis_image(im) for im in images])


def tis_boxes(boxes: np.ndarray, image_size: tuple[int, int]) -> np.ndarray:
    """(n, 4) original-pixel boxes (x0, y0, x1, y1) of an image of ``image_size = (w, h)`` on the TIS input
    grid (float, clipped to [0, 224]; boxes with no area left are removed)."""
    w, h = image_size
    top, left = _crop_offsets()
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4).copy()
    b[:, [0, 2]] = b[:, [0, 2]] * (TIS_RESIZE[1] / w) - left
    b[:, [1, 3]] = b[:, [1, 3]] * (TIS_RESIZE[0] / h) - top
    b[:, [0, 2]] = b[:, [0, 2]].clip(0, TIS_CROP[1])
    b[:, [1, 3]] = b[:, [1, 3]].clip(0, TIS_CROP[0])
    keep = (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])
    return b[keep]
