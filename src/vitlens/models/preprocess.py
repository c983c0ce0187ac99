"""Image loading and the eval transform (resize, centre crop, normalise)."""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import InputError

ImageLike = Union[str, os.PathLike, Image.Image, np.ndarray, torch.Tensor]

BACKGROUNDS = {"white": (255, 255, 255), "black": (0, 0, 0)}
_UNIT_SLACK = 1e-3  # float pixels up to 1 + this are read as [0, 1] (rounding of a [0, 1] image)


def _background(background: str) -> tuple[int, int, int]:
    if background not in BACKGROUNDS:
        raise InputError(f"background='{background}' is not one of {', '.join(BACKGROUNDS)} "
                         "(the colour transparent pixels are composited on).")
    return BACKGROUNDS[background]


def _to_uint8(arr: np.ndarray, what: str) -> np.ndarray:
    """Pixel values -> uint8 with the range the dtype implies (see :func:`load_image`)."""
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8) * 255
    if arr.dtype == np.uint16 or arr.dtype == np.dtype(">u2"):
        return np.round(arr.astype(np.float64) / 257.0).astype(np.uint8)  # 65535 -> 255
    if np.issubdtype(arr.dtype, np.integer):
        raise InputError(f"{what} has integer dtype {arr.dtype}, whose pixel range is ambiguous: cast it to "
                         "uint8 (0-255) or uint16 (0-65535) to say which range it uses.")
    if np.issubdtype(arr.dtype, np.floating):
        a = arr.astype(np.float64)
        if not np.isfinite(a).all():
            raise InputError(f"{what} contains NaN or infinite values.")
        lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
        if lo < 0:
            raise InputError(f"{what} has negative values (min {lo:.3g}): it looks normalised already. Give pixels "
                             "in [0, 1] or [0, 255] to preprocess, or pass a normalised (B, 3, H, W) batch to explain.")
        if hi <= 1 + _UNIT_SLACK:
            return np.round(np.clip(a, 0, 1) * 255).astype(np.uint8)
        if hi <= 255:
            return np.round(a).astype(np.uint8)
        raise InputError(f"{what} has float values up to {hi:.3g}: pixels must be in [0, 1] or [0, 255] "
                         "(for 16-bit data give a uint16 array).")
    raise InputError(f"{what} has unsupported dtype {arr.dtype}; give uint8, uint16 or float pixels.")


def _array_to_pil(arr: np.ndarray, what: str, background: str, channels_first: bool = False) -> Image.Image:
    """(H, W), (H, W, C) or (C, H, W) with C in 1, 3, 4 -> RGB PIL image. Arrays are read channels-last
    unless only the first axis can be channels; tensors (``channels_first``) the other way round."""
    if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and (channels_first or arr.shape[-1] not in (1, 3, 4)):
        arr = np.moveaxis(arr, 0, -1)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)):
        raise InputError(f"{what} has shape {tuple(arr.shape)}: expected (H, W), (H, W, 3|4) or (3|4, H, W) pixels.")
    if min(arr.shape[:2]) == 0:
        raise InputError(f"{what} is empty (shape {tuple(arr.shape)}).")
    u8 = np.ascontiguousarray(_to_uint8(arr, what))
    if u8.ndim == 2:
        return Image.fromarray(u8, mode="L").convert("RGB")
    if u8.shape[-1] == 4:
        return _composite(Image.fromarray(u8, mode="RGBA"), background)
    return Image.fromarray(u8, mode="RGB")


def _composite(rgba: Image.Image, background: str) -> Image.Image:
    """Alpha-composite an RGBA image on a plain background (what a viewer shows on that background)."""
    bg = Image.new("RGBA", rgba.size, _background(background) + (255,))
    return Image.alpha_composite(bg, rgba).convert("RGB")


def _pil_to_rgb(im: Image.Image, background: str = "white", what: str = "image") -> Image.Image:
    """Any PIL mode -> the 8-bit RGB image a viewer shows.

    16-bit and 32-bit integer greyscale (``I;16``, ``I;16B``, ``I``) are scaled from 0-65535 (``convert``
    would clip them at 255: an all-white image); float (``F``) is read as [0, 1] or [0, 255] like float
    arrays; palette, LA, RGBA and images with a transparency key are composited on ``background``;
    CMYK, YCbCr, 1-bit and the rest go through PIL's own conversion."""
    mode = im.mode
    if mode.startswith("I;16") or mode == "I":
        a = np.asarray(im)
        if mode == "I":  # 32-bit container of 16-bit data (PNG, TIFF): clip to the 16-bit range
            a = np.clip(a, 0, 65535)
        return _array_to_pil(a.astype(np.uint16), what, background)
    if mode == "F":
        return _array_to_pil(np.asarray(im, dtype=np.float32), what, background)
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info
    if has_alpha:
        return _composite(im.convert("RGBA"), background)
    if mode == "RGB":
        return im.copy()
    try:
        return im.convert("RGB")
    except ValueError as e:
        raise InputError(f"cannot convert {what} from PIL mode {mode} to RGB: {e}") from None


def load_image(src: ImageLike, background: str = "white") -> Image.Image:
    """Open an image as the 8-bit RGB image a viewer shows.

    Args:
        src: a path; a PIL image (any mode, its current frame); an (H, W), (H, W, C) or (C, H, W) numpy array
            or torch tensor (C = 1, 3 or 4; arrays are read channels-last and tensors channels-first when both
            fit) of ``uint8`` (0-255), ``uint16`` (0-65535) or float pixels in [0, 1] or [0, 255]
            (float values up to 1.001 are read as [0, 1]; negative values, values above 255 and other
            integer dtypes raise :class:`InputError`, as their range is ambiguous).
        background: ``"white"`` (default) or ``"black"``: what transparent pixels (RGBA, LA, palette with
            transparency) are composited on.

    Files: the EXIF orientation is applied (``ImageOps.exif_transpose``), animated images give their first
    frame, and every PIL mode is converted as in :func:`_pil_to_rgb` (16-bit greyscale is scaled, not clipped).
    """
    _background(background)
    if isinstance(src, Image.Image):
        return _pil_to_rgb(src, background)
    if isinstance(src, torch.Tensor):
        return _array_to_pil(src.detach().cpu().numpy(), f"tensor of shape {tuple(src.shape)}", background,
                             channels_first=True)
    if isinstance(src, np.ndarray):
        return _array_to_pil(src, f"array of shape {src.shape}", background)
    if isinstance(src, (str, os.PathLike)):
        path = Path(src)
        if not path.exists():
            raise InputError(f"image file not found: {path}")
        if path.is_dir():
            raise InputError(f"{path} is a folder, not an image file.")
        try:
            with Image.open(path) as im:
                if getattr(im, "n_frames", 1) > 1:
                    im.seek(0)  # animated: the first frame
                im.load()
                im = ImageOps.exif_transpose(im)
                return _pil_to_rgb(im, background, what=str(path))
        except (UnidentifiedImageError, OSError, SyntaxError) as e:
            raise InputError(f"cannot read image {path}: {e}. Is it an image file PIL can open?") from None
        except Image.DecompressionBombError as e:
            raise InputError(f"cannot read image {path}: {e}") from None
    raise InputError(f"cannot interpret {type(src).__name__} as an image (give a path, PIL image, array or tensor).")


def exif_orientation(path: Union[str, os.PathLike]) -> tuple[tuple[int, int], int]:
    """((width, height) as stored, EXIF orientation tag 1-8; 1 when absent or invalid) of an image file."""
    with Image.open(path) as im:
        w, h = im.size
        orientation = im.getexif().get(0x0112, 1)
    return (w, h), orientation if orientation in range(1, 9) else 1


def image_size(path: Union[str, os.PathLike]) -> tuple[int, int]:
    """(width, height) of an image file as :func:`load_image` shows it (EXIF orientation applied)."""
    (w, h), orientation = exif_orientation(path)
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def orient_boxes(boxes: np.ndarray, stored_size: tuple[int, int], orientation: int) -> np.ndarray:
    """(n, 4) boxes (x0, y0, x1, y1, continuous pixel edges) given on the image *as stored* mapped onto
    the image :func:`load_image` returns, i.e. after ``ImageOps.exif_transpose`` for EXIF ``orientation``
    (2 mirror, 3 rotate 180, 4 flip, 5 transpose, 6 rotate 90 clockwise, 7 transverse, 8 rotate 90
    counter-clockwise). ``stored_size`` = (w, h) as stored."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    w, h = stored_size
    x0, y0, x1, y1 = b.T
    if orientation == 2:
        out = (w - x1, y0, w - x0, y1)
    elif orientation == 3:
        out = (w - x1, h - y1, w - x0, h - y0)
    elif orientation == 4:
        out = (x0, h - y1, x1, h - y0)
    elif orientation == 5:  # transpose: (x, y) -> (y, x)
        out = (y0, x0, y1, x1)
    elif orientation == 6:  # rotated 90 degrees clockwise for display: (x, y) -> (h - y, x)
        out = (h - y1, x0, h - y0, x1)
    elif orientation == 7:  # transverse: (x, y) -> (h - y, w - x)
        out = (h - y1, w - x1, h - y0, w - x0)
    elif orientation == 8:  # rotated 90 degrees counter-clockwise for display: (x, y) -> (y, w - x)
        out = (y0, w - x1, y1, w - x0)
    else:
        return b.copy()
    return np.stack(out, axis=1)


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
                      transform: Optional[Callable[[Image.Image], torch.Tensor]] = None,
                      background: str = "white") -> torch.Tensor:
    """Load and transform one image or a list of them into a (B, 3, H, W) batch.

    A 4-D array / tensor is a batch of images ((B, H, W, C) or (B, C, H, W)); see :func:`load_image` for
    the accepted formats, pixel ranges and ``background`` (what transparent pixels are composited on)."""
    if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4:
        images = list(images)
    elif isinstance(images, (str, os.PathLike, Image.Image, np.ndarray, torch.Tensor)):
        images = [images]
    images = list(images)
    if not images:
        raise InputError("no images given.")
    tf = transform or eval_transform(size, mean, std, crop_pct, interpolation)
    return torch.stack([tf(load_image(im, background)) for im in images])


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
