"""Batch sizes, progress bars and seeded generators shared by the methods and metrics."""
from __future__ import annotations

import os
import sys
from typing import Iterator, Optional

import torch

from .errors import InputError

#: Upper bound on the number of token-activations (rows x tokens x width) one CPU batch may hold.
CPU_ACTIVATION_BUDGET = 2 ** 23
#: Fraction of the free CUDA memory a batch may use.
CUDA_MEMORY_FRACTION = 0.5


def resolve_batch_size(requested: Optional[int], adapter, tokens: int, total: int,
                       activations_per_token: int = 12) -> int:
    """The number of model inputs to run at once.

    ``requested`` wins when given (must be >= 1). Otherwise, on CUDA the batch is sized so that its
    activations (``tokens x embed_dim x activations_per_token`` floats per input, a generous bound
    on a ViT block's live intermediates plus the heads x tokens^2 attention) use at most half of the free
    memory (2 bytes per element when the forward passes run at bf16/fp16, see :mod:`vitlens.precision`;
    a batch that still runs out of memory is halved and retried there); on the CPU a fixed activation
    budget that keeps the working set cache-friendly.
    """
    if requested is not None:
        if int(requested) < 1:
            raise InputError(f"batch_size must be >= 1, got {requested}.")
        return max(1, min(int(requested), total))
    width = getattr(adapter, "embed_dim", None) or _embed_dim(adapter)
    per_input = tokens * (width * activations_per_token + adapter.num_heads * tokens * 2)
    dev = adapter.device
    if dev.type == "cuda":
        from .precision import element_bytes

        free, _ = torch.cuda.mem_get_info(dev)
        budget = free * CUDA_MEMORY_FRACTION / element_bytes(adapter)
    else:
        budget = CPU_ACTIVATION_BUDGET
    return int(max(1, min(total, budget // max(per_input, 1))))


def _embed_dim(adapter) -> int:
    spec = adapter.blocks[0]
    norm = spec.norm1
    shape = getattr(norm, "normalized_shape", None)
    if shape:
        return int(shape[-1])
    return 768


def batch_slices(total: int, batch_size: int) -> Iterator[slice]:
    """Consecutive slices covering ``range(total)`` in chunks of ``batch_size``."""
    for start in range(0, total, batch_size):
        yield slice(start, min(start + batch_size, total))


def progress(total: int, desc: str, enabled: Optional[bool] = None, unit: str = "it"):
    """A tqdm progress bar (silent when ``enabled`` is False, or None and stderr is not a terminal)."""
    from tqdm.auto import tqdm

    if enabled is None:
        enabled = sys.stderr.isatty() and not os.environ.get("VITLENS_NO_PROGRESS")
    return tqdm(total=total, desc=desc, disable=not enabled, unit=unit, leave=False, dynamic_ncols=True)


def generator(seed: Optional[int], device: torch.device | str = "cpu") -> torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded with ``seed`` (0 when None, so results are repeatable)."""
    g = torch.Generator(device=device)
    g.manual_seed(0 if seed is None else int(seed))
    return g
