"""Image loading and the eval transform (resize, centre crop, normalise)."""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..errors import InputError

ImageLike = Union[str, os.PathLike, Image.Image, np.ndarray]


def load_image(src: ImageLike) -> Image.Image:
    """Open an image from a path, a PIL image or an (H, W[, C]) uint8/float array, as RGB."""
    if isinstance(src, Image.Image):
        return src.convert("RGB")
    if isinstance(src, np.ndarray):
        arr = src
        if arr.dtype != np.uint8:
            arr = np.clip(arr * (255.0 if arr.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
        return Image.fromarray(arr).convert("RGB")
    if isinstance(src, (str, os.PathLike)):
        path = Path(src)
        if not path.exists():
            raise InputError(f"image file not found: {path}")
        if path.is_dir():
            raise InputError(f"{path} is a folder, not an image file.")
        try:
            with Image.open(path) as im:
                return im.convert("RGB")
        except (UnidentifiedImageError, OSError) as e:
            raise InputError(f"cannot read image {path}: {e}") from None
    raise InputError(f"cannot interpret {type(src).__name__} as an image (give a path, PIL image or array).")


def eval_transform(size: tuple[int, int], mean: Sequence[float], std: Sequence[float],
                   crop_pct: float = 0.875, interpolation: str = "bicubic") -> Callable[[Image.Image], torch.Tensor]:
    """timm's eval transform: resize the short side to size/crop_pct, centre crop, to tensor, normalise."""
    from torchvision import transforms as T

    interp = {"bicubic": T.InterpolationMode.BICUBIC, "bilinear": T.InterpolationMode.BILINEAR,
              "nearest": T.InterpolationMode.NEAREST}.get(interpolation, T.InterpolationMode.BICUBIC)
    h, w = size
    if h == w:
        scale = math.floor(h / crop_pct)
    else:
        scale = (math.floor(h / crop_pct), math.floor(w / crop_pct))
    return T.Compose([T.Resize(scale, interpolation=interp), T.CenterCrop((h, w)), T.ToTensor(),
                      T.Normalize(mean, std)])


def preprocess_images(images: Union[ImageLike, Iterable[ImageLike]], size: tuple[int, int],
                      mean: Sequence[float], std: Sequence[float], crop_pct: float = 0.875,
                      interpolation: str = "bicubic",
                      transform: Optional[Callable[[Image.Image], torch.Tensor]] = None) -> torch.Tensor:
    """Load and transform one image or a list of them into a (B, 3, H, W) batch."""
    if isinstance(images, (str, os.PathLike, Image.Image, np.ndarray)):
        images = [images]
    images = list(images)
    if not images:
        raise InputError("no images given.")
    tf = transform or eval_transform(size, mean, std, crop_pct, interpolation)
    return torch.stack([tf(load_image(im)) for im in images])


def denormalise(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Undo the normalisation: (B, 3, H, W) in model space -> pixels in [0, 1]."""
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device)[:, None, None]
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device)[:, None, None]
    return (x * s + m).clamp(0, 1)


def normalise(pixels: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Pixels in [0, 1] -> model space."""
    m = torch.as_tensor(mean, dtype=pixels.dtype, device=pixels.device)[:, None, None]
    s = torch.as_tensor(std, dtype=pixels.dtype, device=pixels.device)[:, None, None]
    return (pixels - m) / s
