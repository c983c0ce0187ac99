"""Which blocks a method reads: the one ``layers=`` convention of every method.

It follows timm's ``feature_take_indices`` (``timm.models._features``), with one extension:

* ``None``: every block;
* an int ``n >= 1``: the last ``n`` blocks;
* a float ``f`` in (0, 1]: the last ``ceil(f * L)`` blocks (a share of the depth, e.g. LeGrad's last
  40 %: ``0.4``; the extension);
* a sequence of ints: exactly those blocks, negatives counted from the end (``[-1]`` is the last block);
  duplicates are merged and the result is sorted.

Methods that read a single block (Grad-CAM, raw attention, AttentionCAM, Score-CAM, ViT-CX) take the same
selection and require it to pick exactly one block; for them ``None`` picks the model's default block
(:attr:`vitlens.ViTAdapter.default_feature_layer`: the last block; for Swin the last block of the
second-to-last stage, ViT-CX's choice).

``LayersLike`` is the type hint every method uses for the parameter (the parameter converter reads it).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

from ..errors import InputError

LayersLike = Union[None, int, float, Sequence[int]]

#: the one-line summary of the convention, quoted by error messages and docstrings
CONVENTION = "None = all blocks, an int n = the last n, a float f = the last ceil(f * L), a list = those blocks"


def take_indices(layers: LayersLike, num_blocks: int, *, method: str = "", name: str = "layers") -> list[int]:
    """Sorted unique block indices in ``[0, num_blocks)`` selected by ``layers`` (see the module docstring).

    Raises :class:`~vitlens.errors.InputError` naming ``method`` and the model's depth when the
    selection is empty, out of range or not of a supported type.

    Example::

        >>> take_indices(None, 4), take_indices(2, 4), take_indices(0.4, 12), take_indices([-1, 0], 4)
        ([0, 1, 2, 3], [2, 3], [7, 8, 9, 10, 11], [0, 3])
    """
    where = f"{method}: " if method else ""
    L = int(num_blocks)
    if L < 1:
        raise InputError(f"{where}the model has no transformer blocks to select {name} from.")
    if layers is None:
        return list(range(L))
    if isinstance(layers, bool) or isinstance(layers, str):
        raise InputError(f"{where}{name}={layers!r} is not a block selection ({CONVENTION}).")
    if isinstance(layers, float):
        if not 0.0 < layers <= 1.0:
            raise InputError(f"{where}{name}={layers}: a share of the blocks must lie in (0, 1].")
        k = max(1, math.ceil(round(layers * L, 6)))
        return list(range(L - k, L))
    if isinstance(layers, int) or hasattr(layers, "__index__") and not hasattr(layers, "__len__"):
        n = int(layers)
        if not 1 <= n <= L:
            raise InputError(f"{where}{name}={n} asks for the last {n} blocks but the model has {L}; give a count "
                             f"in 1..{L}, or a list of block indices such as [{-1 if n < 1 else 0}] ({CONVENTION}).")
        return list(range(L - n, L))
    try:
        idx = [int(i) for i in layers]
    except (TypeError, ValueError):
        raise InputError(f"{where}{name}={layers!r} is not a block selection ({CONVENTION}).") from None
    if not idx:
        raise InputError(f"{where}{name}: the list of block indices is empty.")
    bad = [i for i in idx if not -L <= i < L]
    if bad:
        raise InputError(f"{where}{name} {bad} out of range: the model has {L} blocks (0..{L - 1}, or -{L}..-1).")
    return sorted({i % L for i in idx})


def take_one(layers: LayersLike, num_blocks: int, default: int, *, method: str = "", name: str = "layers") -> int:
    """The single block a one-block method reads: ``default`` for ``None``, else the one block the
    selection picks (an error naming ``method`` when it picks several)."""
    if layers is None:
        return int(default)
    sel = take_indices(layers, num_blocks, method=method, name=name)
    if len(sel) != 1:
        raise InputError(f"{method + ': ' if method else ''}{name}={layers!r} selects {len(sel)} blocks; this method "
                         "reads one block: give one index, e.g. [-1] (the last block).")
    return sel[0]


def suffix_start(blocks: Sequence[int], num_blocks: int) -> Optional[int]:
    """``s`` when ``blocks`` is ``s, s+1, ..., L-1`` (the old ``start_layer=s``), else ``None``."""
    b = list(blocks)
    return b[0] if b and b == list(range(b[0], int(num_blocks))) else None
