"""Where a bench run is: a start line, one line per method / metric call, a heartbeat, and the ETA.

Units of work: one *map* per (method entry, image) and one *row* per (method entry, metric, image).
At start the runner counts what its database already holds for this process's images
(:meth:`BenchProgress.start_line`: ``resuming: 30 of 54 maps, 12 of 108 rows done``).

After every method call (``maps tis: 8 images in 71.2 s, 0.11 img/s``) and every metric call a line
gives the counts done so far and the ETA of the whole run, estimated from the work done so far:

    ETA = overhead * sum over keys k of remaining_k * seconds_per_image_k

where a key is a method entry (maps) or a (metric, method entry) pair (rows), ``seconds_per_image_k``
is the mean compute time measured for that key in this run, and ``overhead`` = wall time since the
start / compute time measured (image decoding, storing, ...; >= 1). A key not timed yet borrows the
mean of the same metric over other methods, else the mean of its kind (maps or rows); the ETA is then
marked ``~`` (rough) until every key has been timed once.

Output: on a terminal, a tqdm bar (total = maps + rows) with the lines printed above it; elsewhere
(a log file, a pipe, CI) plain lines on stderr plus a heartbeat line at least every ``interval``
seconds (30; ``VITLENS_PROGRESS_INTERVAL`` overrides it) while a long call runs. Everything also goes
to the run's log file.
"""
from __future__ import annotations

import logging
import os
import sys
import threading
import time
from typing import Optional

DEFAULT_INTERVAL = 30.0


def fmt_duration(s: float) -> str:
    if s != s or s == float("inf"):
        return "?"
    s = int(round(s))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


class BenchProgress:
    """Counts, rates, ETA and output of one runner process (see the module docstring).

    Args:
        maps_total / maps_done: per method label, the maps this process is responsible for / already has.
        rows_total / rows_done: per (metric, method label), likewise for result rows.
        enabled: ``None``: on unless ``VITLENS_NO_PROGRESS`` is set; ``False``: only the log file.
        log: the run's file logger (every line goes there too).
    """

    def __init__(self, maps_total: dict, maps_done: dict, rows_total: dict, rows_done: dict,
                 enabled: Optional[bool] = None, log: Optional[logging.Logger] = None, desc: str = "bench",
                 interval: Optional[float] = None, stream=None):
        self.maps_total, self.rows_total = dict(maps_total), dict(rows_total)
        self.done = {("map", k): v for k, v in maps_done.items()}
        self.done.update({("row", *k): v for k, v in rows_done.items()})
        self.total = {("map", k): v for k, v in maps_total.items()}
        self.total.update({("row", *k): v for k, v in rows_total.items()})
        self.secs: dict = {}
        self.count: dict = {}
        self.errors = 0
        self.log = log
        self.desc = desc
        self.stream = stream or sys.stderr
        if enabled is None:
            enabled = not os.environ.get("VITLENS_NO_PROGRESS")
        self.enabled = bool(enabled)
        self.tty = self.enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        env = os.environ.get("VITLENS_PROGRESS_INTERVAL")
        self.interval = float(interval if interval is not None else env if env else DEFAULT_INTERVAL)
        self.t0 = time.perf_counter()
        self.last_output = self.t0
        self.current: Optional[tuple] = None  # (what, n, first_id, t_start)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.bar = None
        if self.tty:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=sum(self.total.values()), initial=sum(self.done.values()), desc=desc,
                            unit="item", dynamic_ncols=True, file=self.stream,
                            bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt}{postfix}")
        self._thread: Optional[threading.Thread] = None
        if self.enabled:
            self._thread = threading.Thread(target=self._heartbeat, name="vitlens-bench-progress", daemon=True)
            self._thread.start()

    # ------------------------------------------------------------------------------------------ counts
    def _sum(self, kind: str, of: dict) -> int:
        return sum(v for k, v in of.items() if k[0] == kind)

    def counts(self) -> str:
        return (f"maps {self._sum('map', self.done)}/{self._sum('map', self.total)}, "
                f"rows {self._sum('row', self.done)}/{self._sum('row', self.total)}")

    def start_line(self) -> str:
        md, mt = self._sum("map", self.done), self._sum("map", self.total)
        rd, rt = self._sum("row", self.done), self._sum("row", self.total)
        if md or rd:
            return f"resuming: {md} of {mt} maps, {rd} of {rt} rows done"
        return f"starting: {mt} maps and {rt} rows to compute"

    def _rate(self, key: tuple) -> tuple[Optional[float], bool]:
        """Seconds per image for ``key`` and whether it was measured (False: borrowed)."""
        if self.count.get(key):
            return self.secs[key] / self.count[key], True
        same = [k for k in self.count if k[0] == key[0] and (key[0] == "map" or k[1] == key[1])]
        if not same:
            same = [k for k in self.count if k[0] == key[0]]
        if not same:
            return None, False
        return sum(self.secs[k] for k in same) / sum(self.count[k] for k in same), False

    def eta(self) -> tuple[Optional[float], bool]:
        """(seconds left, exact) where ``exact`` is False while some key has not been timed."""
        compute = sum(self.secs.values())
        if compute <= 0:
            return None, False
        overhead = max(1.0, (time.perf_counter() - self.t0) / compute)
        left, exact = 0.0, True
        for key, tot in self.total.items():
            rem = tot - self.done.get(key, 0)
            if rem <= 0:
                continue
            r, measured = self._rate(key)
            if r is None:
                return None, False
            exact &= measured
            left += rem * r
        return left * overhead, exact

    def _eta_str(self) -> str:
        s, exact = self.eta()
        return "ETA ?" if s is None else f"ETA {'' if exact else '~'}{fmt_duration(s)}"

    # ------------------------------------------------------------------------------------------ output
    def emit(self, line: str, level: int = logging.INFO) -> None:
        if self.log is not None:
            self.log.log(level, line)
        if not self.enabled:
            return
        with self._lock:
            self.last_output = time.perf_counter()
            if self.bar is not None:
                self.bar.write(line, file=self.stream)
            else:
                print(f"[{self.desc} {time.strftime('%H:%M:%S')}] {line}", file=self.stream, flush=True)

    def _refresh_bar(self) -> None:
        if self.bar is None:
            return
        with self._lock:
            cur = ""
            if self.current is not None:
                what, n, _, ts = self.current
                cur = f"{what} ({n} img, {fmt_duration(time.perf_counter() - ts)}) · "
            self.bar.n = sum(self.done.values())
            self.bar.set_postfix_str(cur + self._eta_str(), refresh=True)

    def _heartbeat(self) -> None:
        tick = min(1.0, self.interval / 3)
        while not self._stop.wait(tick):
            if self.tty:
                self._refresh_bar()
            elif time.perf_counter() - self.last_output >= self.interval - tick:  # a gap never exceeds interval
                cur = self.current
                if cur is not None:
                    what, n, first, ts = cur
                    msg = (f"working: {what} on {n} images (from {first}) for "
                           f"{fmt_duration(time.perf_counter() - ts)}")
                else:
                    msg = "working"
                self.emit(f"{msg} | done: {self.counts()} | {self._eta_str()}")

    def begin(self, what: str, n: int, first_id: str) -> None:
        """A method or metric call on ``n`` images starts (what: ``maps tis`` / ``insertion tis``)."""
        self.current = (what, n, first_id, time.perf_counter())
        self._refresh_bar()

    def end(self, key: tuple, what: str, n_ok: int, secs: float, n_failed: int = 0) -> None:
        """A call finished: ``key`` = ("map", label) or ("row", metric, label)."""
        self.current = None
        n = n_ok + n_failed
        self.secs[key] = self.secs.get(key, 0.0) + secs
        self.count[key] = self.count.get(key, 0) + n
        self.done[key] = self.done.get(key, 0) + n  # failed items are settled for this run too
        self.errors += n_failed
        rate = f"{n / secs:.3g} img/s" if secs > 0 else "-"
        fail = f", {n_failed} failed" if n_failed else ""
        self.emit(f"{what}: {n} images in {secs:.2f} s ({rate}{fail}) | done: {self.counts()} | {self._eta_str()}")
        self._refresh_bar()

    def skip(self, key: tuple, n: int) -> None:
        """``n`` items of ``key`` cannot be computed in this run (e.g. their image is unreadable)."""
        self.done[key] = self.done.get(key, 0) + n

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.bar is not None:
            self._refresh_bar()
            self.bar.close()
