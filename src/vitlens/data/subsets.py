"""Named image subsets of the ImageNet validation set.

``"tis5000"``: the 5000 indices of ``config/dataset/indices/sub5000.yaml`` of
aenglebert/Transformer_Input_Sampling (the ``ilsvrc2012_subset`` / ``ilsvrc2012_bboxes_subset`` datasets
of ``config/evaluate.yaml``), shipped as ``vitlens/data/tis_sub5000.txt`` (one index per line, in the
file's order). The TIS dataset is ``torch.utils.data.Subset(torchvision.datasets.ImageNet(split="val"),
indices)``: index ``i`` is the ``i``-th sample (0-based) of torchvision's ``ImageFolder`` order: class
folders sorted by WordNet id (``n01440764`` first), then file names sorted within each class. The
subset is iterated in the order of the index list (not sorted).

Resolving the indices needs the class of *every* validation image (all 50,000 rows of
``LOC_val_solution.csv``), not only of the images present on disk.
"""
from __future__ import annotations

import csv
from importlib import resources
from pathlib import Path
from typing import Sequence

from ..errors import InputError

SUBSETS = {"tis5000": "tis_sub5000.txt"}
IMAGENET_VAL_SIZE = 50000


def subset_indices(name: str) -> list[int]:
    """The index list of subset ``name`` in its file order."""
    if name not in SUBSETS:
        raise InputError(f"unknown subset '{name}'; choose one of {', '.join(SUBSETS)}.")
    text = resources.files("vitlens.data").joinpath(SUBSETS[name]).read_text()
    return [int(v) for v in text.split()]


def imagefolder_order(records: Sequence[tuple[str, str]]) -> list[str]:
    """Image ids in torchvision ``ImageFolder`` order from ``(image_id, synset)`` pairs: by synset, then by
    file name (the ImageNet validation file name is ``<image_id>.JPEG`` for every image, so sorting ids
    sorts file names)."""
    return [iid for syn, iid in sorted((syn, iid) for iid, syn in records)]


def read_solution(path) -> list[tuple[str, str]]:
    """``(image_id, synset of the first box)`` for every row of a ``LOC_val_solution.csv``."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"localisation CSV not found: {p}")
    with open(p, newline="") as f:
        return [(row["ImageId"], row["PredictionString"].split()[0]) for row in csv.DictReader(f)]


def resolve_subset(name: str, records: Sequence[tuple[str, str]]) -> list[str]:
    """Image ids of subset ``name``, in the subset's order, from the (image_id, synset) pairs of the whole
    validation set."""
    if len(records) != IMAGENET_VAL_SIZE:
        raise InputError(f"subset '{name}' indexes the full ImageNet validation set ({IMAGENET_VAL_SIZE} images in "
                         f"torchvision ImageFolder order); the localisation CSV lists {len(records)} images. "
                         "Give the complete LOC_val_solution.csv (images may be missing on disk).")
    order = imagefolder_order(records)
    return [order[i] for i in subset_indices(name)]
