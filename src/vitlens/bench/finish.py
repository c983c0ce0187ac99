"""The end of a benchmark run: wait for every process, merge this launch's shard files into the folder's
database, write the reports, and return the run's summary.

Only rank 0 of a launch merges and reports, after the barrier (nobody writes the shard files any more);
a process of a manual ``--shard i/n`` run does neither (``vitlens report DIR`` merges and reports once
every shard is done).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

from . import distributed
from .config import BenchConfig
from .distributed import ShardInfo
from .plan import Plan
from .report import write_report
from .shards import merge_into, shard_path
from .store import MAIN_DB


def finish(cfg: BenchConfig, plan: Plan, shard: ShardInfo, computed: dict, errors: list, t_start: float,
           log: logging.Logger) -> dict:
    """The run's summary (``out``, ``images``, ``shard``, ``maps``/``rows`` computed, ``seconds``, ``rank``,
    ``errors``; ``report``/``subset_report`` when written), after merging and reporting (see above)."""
    out = Path(cfg.out)
    log.info("shard done: %d maps and %d rows computed, %d errors", computed["maps"], computed["rows"],
             len(errors))
    distributed.barrier(shard)
    summary = dict(out=str(out), images=len(plan.items), shard=f"{shard.index}/{shard.count}", **computed,
                   seconds=time.perf_counter() - t_start, rank=shard.rank, errors=errors)
    if shard.rank == 0 and (shard.world > 1 or not shard.sharded):
        if shard.world > 1:  # every rank passed the barrier: nobody writes the shard files any more
            base = shard.index - shard.rank  # this launch's shards: base .. base + world - 1
            merge_into(out / MAIN_DB, [shard_path(out, base + r, shard.count) for r in range(shard.world)])
        if cfg.report:
            # results.md/csv and report.html always show everything the folder's database holds;
            # this run's own view only when asked (--report-subset: OUT/this-run/)
            summary["report"] = write_report(out, examples=cfg.examples)
            if getattr(cfg, "report_subset", False):
                summary["subset_report"] = write_report(out, run_keys=list(plan.run_keys.values()),
                                                        protocol_keys=[m.key for m in plan.metrics],
                                                        examples=cfg.examples, subset="this-run")
        summary["seconds"] = time.perf_counter() - t_start
    log.info("finished in %.1f s", summary["seconds"])
    return summary
