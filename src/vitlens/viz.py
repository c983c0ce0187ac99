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
              maps: dict, cell: float = 2.0, notes: Optional[dict] = None, captions: Optional[dict] = None,
              timings: Optional[dict] = None, cmap: str = "jet") -> Path:
    """Comparison figure: one row per method, one column per image, and a colour bar.

    The first row shows the images, captioned with their name and ``captions[image]`` (e.g. the
    predicted class); each following row is a method, labelled on the left with its name (and its time,
    ``timings[method]`` seconds). ``maps[(image, method)]`` is an (H, W) map in [0, 1] (a missing entry
    draws "n/a"); ``notes[(image, method)]`` an optional short caption inside the cell's top-left corner.
    ``rows`` are the image names and ``columns`` the method names (the argument names follow the data
    keys, not the layout).
    """
    plt = _plt()
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    images_, methods_ = list(rows), list(columns)
    n_img, n_rows = len(images_), len(methods_) + 1
    label_w, cbar_w, top, gap = 2.5, 1.0, 0.5, 0.08  # inches: method labels, colour bar, image captions, row gap
    fig_w = label_w + cell * n_img + cbar_w
    fig_h = top + n_rows * (cell + gap)
    fig = plt.figure(figsize=(fig_w, fig_h))
    fig.subplots_adjust(left=label_w / fig_w, right=(label_w + cell * n_img) / fig_w, top=1 - top / fig_h,
                        bottom=0.1 / fig_h, wspace=0.05, hspace=gap / cell)
    axes = fig.subplots(n_rows, n_img, squeeze=False)
    for j, (img, name) in enumerate(zip(images, images_)):
        ax = axes[0, j]
        ax.imshow(img)
        ax.set_axis_off()
        cap = name if not captions or name not in captions else f"{name}\n{captions[name]}"
        ax.set_title(cap, fontsize=10)
    axes[0, 0].text(-0.06, 0.5, "image\n(predicted class)", transform=axes[0, 0].transAxes, ha="right",
                    va="center", fontsize=11, fontweight="bold")
    for i, method in enumerate(methods_, start=1):
        for j, (img, name) in enumerate(zip(images, images_)):
            ax = axes[i, j]
            m = maps.get((name, method))
            if m is None:
                ax.set_axis_off()
                ax.text(0.5, 0.5, "n/a", ha="center", va="center", transform=ax.transAxes, fontsize=10)
            else:
                overlay(ax, img, m, cmap=cmap)
            if notes and (name, method) in notes:
                ax.text(0.02, 0.98, notes[(name, method)], ha="left", va="top", fontsize=8, transform=ax.transAxes,
                        bbox=dict(facecolor="white", alpha=0.7, edgecolor="none", pad=1))
        label = method if not timings or method not in timings else f"{method}\n({timings[method]:.1f} s)"
        axes[i, 0].text(-0.06, 0.5, label, transform=axes[i, 0].transAxes, ha="right", va="center", fontsize=11,
                        fontweight="bold")
    sm = ScalarMappable(norm=Normalize(0.0, 1.0), cmap=cmap)
    bar_h = min(3, n_rows) * (cell + gap) - gap  # beside the first rows, where the eye starts
    cax = fig.add_axes([(label_w + cell * n_img + 0.3) / fig_w, 1 - (top + bar_h) / fig_h, 0.18 / fig_w, bar_h / fig_h])
    cb = fig.colorbar(sm, cax=cax)
    cb.set_label("saliency (each map min-max normalised to [0, 1])", fontsize=9)
    path = Path(path)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
