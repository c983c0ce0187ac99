"""Built-in sample images for the demo: scikit-image's bundled photographs (no download)."""
from __future__ import annotations

from PIL import Image

#: scikit-image data functions used as demo images (all ship with the package).
SAMPLE_NAMES = ("chelsea", "coffee", "astronaut", "rocket")


def sample_images(names=SAMPLE_NAMES) -> dict[str, Image.Image]:
    """The demo photographs as RGB PIL images, keyed by name."""
    from skimage import data

    return {n: Image.fromarray(getattr(data, n)()).convert("RGB") for n in names}
