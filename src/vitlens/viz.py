"""Figures: heatmap overlays and the image x method comparison grid (matplotlib, Agg backend)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def to_pixels(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """(3, H, W) normalised tensor -> (H, W, 3) float image in [0, 1]."""
    from .models.preprocess import denormalise

    return denormalise(x[None].detach().float().cpu(), mean, std)[0].permute(1, 2, 0).numpy()


def overlay(ax, image: np.ndarray, saliency: np.ndarray, alpha: float = 0.5, cmap: str = "jet") -> None:
    """Draw ``saliency`` (H, W) as a translucent heatmap over ``image`` (H, W, 3) on ``ax``."""
    ax.imshow(image)
    ax.imshow(saliency, cmap=cmap, alpha=alpha, vmin=0.0, vmax=1.0)
    ax.set_axis_off()


def save_overlay(path, image: np.ndarray, saliency: np.ndarray, title: str = "") -> Path:
    """Write a side-by-side PNG: the image and the heatmap overlay, with ``title``."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(8, 4.3))
    axes[0].imshow(image)
    axes[0].set_axis_off()
    overlay(axes[1], image, saliency)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def save_grid(path, images: Sequence[np.ndarray], rows: Sequence[str], columns: Sequence[str],
              maps: dict, cell: float = 2.2, notes: Optional[dict] = None) -> Path:
    """Comparison grid: one row per image (first column the image), one column per method.

    ``maps[(row, column)]`` is an (H, W) map in [0, 1] (a missing entry draws an empty cell);
    ``notes[(row, column)]`` an optional caption under the cell.
    """
    plt = _plt()
    nr, nc = len(rows), len(columns) + 1
    fig, axes = plt.subplots(nr, nc, figsize=(cell * nc, cell * nr + 0.4), squeeze=False)
    for i, (img, rname) in enumerate(zip(images, rows)):
        axes[i, 0].imshow(img)
        axes[i, 0].set_axis_off()
        axes[i, 0].set_title(rname, fontsize=8)
        for j, cname in enumerate(columns):
            ax = axes[i, j + 1]
            m = maps.get((rname, cname))
            if m is None:
                ax.set_axis_off()
                ax.text(0.5, 0.5, "n/a", ha="center", va="center", transform=ax.transAxes)
            else:
                overlay(ax, img, m)
            if i == 0:
                ax.set_title(cname, fontsize=9)
            if notes and (rname, cname) in notes:
                ax.text(0.5, -0.08, notes[(rname, cname)], ha="center", va="top", fontsize=6,
                        transform=ax.transAxes)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
