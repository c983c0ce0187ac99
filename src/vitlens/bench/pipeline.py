"""Overlap image decoding with compute: the next batch is decoded in a background thread.

While batch ``k`` runs its methods and metrics, :class:`Prefetcher` decodes batch ``k + 1`` (PIL decoding
and resizing, the normalising tensor ops and the box masks release the GIL), so the device does not wait
for the CPU between batches. Only batches with missing work are decoded (a resumed run does not decode
finished batches). The decoded batch is handed over once; failures inside the background call are
returned with it (the runner records them in its own thread). Disable with ``VITLENS_BENCH_PREFETCH=0``.
Storing overlaps too: :meth:`.store.Store.start_writer` (disable with ``VITLENS_BENCH_WRITER=0``).
"""
from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Hashable, Optional


class Prefetcher:
    """``submit(key, fn)`` runs ``fn()`` in one background thread; ``take(key)`` returns its result
    (or None if nothing was submitted under ``key``), re-raising nothing: ``fn`` must catch its errors."""

    def __init__(self, enabled: Optional[bool] = None):
        if enabled is None:
            enabled = os.environ.get("VITLENS_BENCH_PREFETCH", "1") not in ("0", "false", "no")
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vitlens-bench-loader") if enabled else None
        self.futures: dict[Hashable, Future] = {}

    def submit(self, key: Hashable, fn: Callable[[], Any]) -> None:
        if self.pool is not None and key not in self.futures:
            self.futures[key] = self.pool.submit(fn)

    def take(self, key: Hashable) -> Optional[Any]:
        fut = self.futures.pop(key, None)
        return None if fut is None else fut.result()

    def close(self) -> None:
        if self.pool is not None:
            for f in self.futures.values():
                f.cancel()
            self.pool.shutdown(wait=True)
            self.futures.clear()
