"""``vitlens bench``: resumable method x metric benchmarks (SQLite store, torchrun sharding, reports).

Usage::

    vitlens bench --weights ../shared/models --data ../shared/data/imagenet-val-sample \\
        --methods tis,rollout,legrad --metrics insertion,deletion,pointing_game --limit 200 --out runs/a
    vitlens bench --config run.toml                   # same keys in a JSON/TOML file (see .config)
    vitlens bench --preset tis-vit --data IMAGENET_VAL --weights W --out runs/tis-vit
    torchrun --nproc_per_node=4 -m vitlens.bench --config run.toml     # one shard per GPU
    vitlens bench --config run.toml --shard 0/2       # by hand on machine A (1/2 on machine B), then
    vitlens report runs/a                             # merge shard files and write the reports

Output folder: ``results.sqlite`` (maps + one row per model/method/image/metric/protocol, and an
``errors`` row per image a method or metric failed on or that could not be read, see :mod:`.store`),
``shards/`` (per-process files of sharded runs), ``logs/bench*.log``, ``results.md``, ``results.csv``
and ``report.html`` for everything in the database (see :mod:`.report`; ``--report-subset`` adds the
run's own view in ``this-run/``), and ``bench.lock`` while a run is active (see :mod:`.lock`). Running the
same command again resumes: it says what it found (``resuming: 30 of 54 maps, 12 of 108 rows done``)
and computes only the missing maps and rows (failed ones are retried); a folder written by vitlens 0.1
resumes too (:mod:`.legacy_keys`; its database is migrated on open, :mod:`.schema`). Progress (:mod:`.progress`): a
line per method and metric call with rates and the ETA of the whole run, on stderr. Bad data
(:mod:`.faults`): an unreadable image or a method/metric that raises on an image is recorded, reported
at the end and in the report, and the run goes on.
"""
from .config import BenchConfig, MethodSpec, build_config
from .report import write_report
from .runner import run_bench

__all__ = ["BenchConfig", "MethodSpec", "build_config", "run_bench", "write_report"]
