"""Bad data does not stop a bench run: find the image a call fails on, record it, go on.

:func:`run_isolated` calls ``fn`` on a batch of image indices; when the call raises, it calls ``fn`` again
on each image alone, so the images the call really fails on are found and every other image still gets
its result. Failures are returned (and recorded by the runner as ``errors`` rows of the store, see
:mod:`.store`), never raised. ``KeyboardInterrupt``/``SystemExit`` are not caught.

Note: a seeded method that draws its randomness per call (e.g. RISE masks, TIS subsets) gives the images
re-run alone other random draws than the batch would have; the runner's batch call on a batch without
a failing image is unchanged, so this only affects batches that contain a failing image, and it is
deterministic (a rerun fails and isolates the same way).
"""
from __future__ import annotations

import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence


@dataclass
class Chunk:
    """The result of ``fn`` on the images ``indices`` and the seconds the call took."""

    indices: list
    result: Any
    seconds: float


def describe_error(e: BaseException) -> str:
    """``Type: first line of the message`` (at most 300 characters)."""
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    out = f"{type(e).__name__}: {msg}" if msg else type(e).__name__
    return out[:300]


def run_isolated(fn: Callable[[list], Any], indices: Sequence[int],
                 log: Optional[Callable[[str], None]] = None) -> tuple[list[Chunk], dict]:
    """``fn(indices)``, or on an exception ``fn([i])`` for each ``i``.

    Returns (chunks that succeeded, ``{index: exception}`` of the images that failed alone).
    The full traceback of each failure goes to ``log`` (the run's log file).
    """
    indices = list(indices)
    if not indices:
        return [], {}
    t0 = time.perf_counter()
    try:
        res = fn(indices)
        return [Chunk(indices, res, time.perf_counter() - t0)], {}
    except Exception as e:  # noqa: BLE001 - any failure of a method/metric on data is isolated
        first = e
        if log is not None:
            log(f"call on {len(indices)} images failed ({describe_error(e)})"
                + ("; retrying image by image" if len(indices) > 1 else "") + "\n"
                + "".join(traceback.format_exception(type(e), e, e.__traceback__)))
    if len(indices) == 1:
        return [], {indices[0]: first}
    chunks, failed = [], {}
    for i in indices:
        t0 = time.perf_counter()
        try:
            chunks.append(Chunk([i], fn([i]), time.perf_counter() - t0))
        except Exception as e:  # noqa: BLE001
            failed[i] = e
            if log is not None:
                log(f"image {i} of the batch fails alone: {describe_error(e)}")
    return chunks, failed
