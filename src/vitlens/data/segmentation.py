"""ImageNet-Segmentation (Guillaumin, Küttel & Ferrari, IJCV 2014): ``gtsegs_ijcv.mat``.

The file is MATLAB v7.3, i.e. HDF5 (read with h5py): ``/value/img`` is an (n, 1) array of object
references, each to a (3, W, H) uint8 image (MATLAB's column-major order); ``/value/gt`` is an (n, 1)
array of references to (1, 1) reference arrays, each pointing to a (W, H) mask (1 object, 0 background).
As in Chefer et al.'s evaluation, images are resized to the model's input size without cropping
(``Resize((H, W))``, bilinear) and masks with nearest-neighbour interpolation.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from ..errors import InputError


class ImageNetSegmentation:
    """The 4,276 images with object masks of ImageNet-Segmentation (or any file in that format)."""

    def __init__(self, path):
        import h5py

        self.path = Path(path)
        if not self.path.is_file():
            raise InputError(f"ImageNet-Segmentation file not found: {self.path}")
        try:
            self._f = h5py.File(self.path, "r")
            self._img = self._f["/value/img"]
            self._gt = self._f["/value/gt"]
        except (OSError, KeyError) as e:
            raise InputError(f"{self.path} is not a gtsegs_ijcv.mat (HDF5 with /value/img and /value/gt): {e}") from None

    def __len__(self) -> int:
        return int(self._img.shape[0])

    def image(self, i: int) -> Image.Image:
        """Image ``i`` as an RGB PIL image."""
        arr = np.array(self._f[self._img[i, 0]]).transpose(2, 1, 0)
        return Image.fromarray(arr.astype(np.uint8)).convert("RGB")

    def mask(self, i: int) -> np.ndarray:
        """(H, W) uint8 mask of image ``i`` (1 object, 0 background)."""
        inner = self._f[self._gt[i, 0]]
        return np.array(self._f[inner[0, 0]]).transpose(1, 0).astype(np.uint8)

    def batch(self, indices: Sequence[int], model) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, masks)``: normalised (n, 3, H, W) images for ``model`` and (n, H, W) long masks."""
        xs = self.images(indices, model.input_size, model.mean, model.std)
        return xs.to(model.device), self.masks(indices, model.input_size)

    def images(self, indices: Sequence[int], size: tuple[int, int], mean, std) -> torch.Tensor:
        """(n, 3, H, W) images resized to ``size`` without cropping (bilinear), normalised with mean/std."""
        from torchvision import transforms as T

        H, W = size
        tf = T.Compose([T.Resize((H, W)), T.ToTensor(), T.Normalize(mean, std)])
        return torch.stack([tf(self.image(i)) for i in indices])

    def masks(self, indices: Sequence[int], size: tuple[int, int]) -> torch.Tensor:
        """(n, H, W) long masks resized to ``size`` with nearest-neighbour interpolation."""
        H, W = size
        return torch.stack([torch.from_numpy(np.array(
            Image.fromarray(self.mask(i)).resize((W, H), Image.NEAREST))).long() for i in indices])

    def close(self) -> None:
        self._f.close()
