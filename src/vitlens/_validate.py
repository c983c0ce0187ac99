"""Input validation shared by the API, the methods and the metrics."""
from __future__ import annotations

import torch

from .errors import InputError


def check_images(x: torch.Tensor, *, patch_size: tuple[int, int] | None = None,
                 expected_size: tuple[int, int] | None = None, name: str = "x") -> torch.Tensor:
    """Check that ``x`` is a finite float (B, 3, H, W) batch; return it unchanged.

    Raises :class:`InputError` naming the problem (wrong rank, channels, size not a multiple of
    the patch size, NaN/Inf values) instead of letting a shape error surface deep in the model.
    """
    if not isinstance(x, torch.Tensor):
        raise InputError(f"{name} must be a torch.Tensor of shape (B, 3, H, W); got {type(x).__name__}. "
                         "Use model.preprocess(images) to turn PIL images or paths into a batch.")
    if x.dim() == 3:
        raise InputError(f"{name} has shape {tuple(x.shape)}: expected a batch (B, 3, H, W); "
                         f"add a batch dimension with {name}.unsqueeze(0).")
    if x.dim() != 4:
        raise InputError(f"{name} must have 4 dimensions (B, 3, H, W); got shape {tuple(x.shape)}.")
    if x.shape[0] == 0:
        raise InputError(f"{name} is an empty batch.")
    if x.shape[1] != 3:
        raise InputError(f"{name} must have 3 colour channels in dimension 1; got shape {tuple(x.shape)}.")
    if not torch.is_floating_point(x):
        raise InputError(f"{name} must be a floating-point tensor; got {x.dtype}.")
    if not torch.isfinite(x).all():
        raise InputError(f"{name} contains NaN or infinite values.")
    h, w = x.shape[-2:]
    if expected_size is not None and (h, w) != tuple(expected_size):
        raise InputError(f"{name} has spatial size {h}x{w} but the model expects "
                         f"{expected_size[0]}x{expected_size[1]} (use model.preprocess, or a model with a dynamic image size).")
    if patch_size is not None and (h % patch_size[0] or w % patch_size[1]):
        raise InputError(f"{name} has spatial size {h}x{w}, which is not a multiple of the patch size "
                         f"{patch_size[0]}x{patch_size[1]}.")
    return x


def check_maps(maps: torch.Tensor, batch: int, size: tuple[int, int], name: str = "maps") -> torch.Tensor:
    """Check a (B, H, W) saliency batch (a (B, 1, H, W) one is squeezed); return it as float."""
    if not isinstance(maps, torch.Tensor):
        raise InputError(f"{name} must be a torch.Tensor of shape (B, H, W); got {type(maps).__name__}.")
    if maps.dim() == 4 and maps.shape[1] == 1:
        maps = maps[:, 0]
    if maps.dim() == 2:
        maps = maps.unsqueeze(0)
    if maps.dim() != 3:
        raise InputError(f"{name} must have shape (B, H, W); got {tuple(maps.shape)}.")
    if maps.shape[0] != batch:
        raise InputError(f"{name} has {maps.shape[0]} maps but there are {batch} images.")
    if tuple(maps.shape[-2:]) != tuple(size):
        raise InputError(f"{name} have size {tuple(maps.shape[-2:])} but the images are {tuple(size)}; "
                         "upsample them to the input resolution first (Explanation.maps already is).")
    maps = maps.float()
    if not torch.isfinite(maps).all():
        raise InputError(f"{name} contain NaN or infinite values.")
    return maps
