"""``vitlens bench``: resumable method x metric benchmarks (SQLite store, torchrun sharding, reports).

Usage::

    vitlens bench --weights ../shared/models --data ../shared/data/imagenet-val-sample \\
        --methods tis,rollout,legrad --metrics insertion,deletion,pointing_game --limit 200 --out runs/a
    vitlens bench --config run.toml                   # same keys in a JSON/TOML file (see .config)
    vitlens bench --preset tis-vit --data IMAGENET_VAL --weights W --out runs/tis-vit
    torchrun --nproc_per_node=4 -m vitlens.bench --config run.toml     # one shard per GPU
    vitlens bench --config run.toml --shard 0/2       # by hand on machine A (1/2 on machine B), then
    vitlens report runs/a                             # merge shard files and write the reports

Output folder: ``results.sqlite`` (maps + one row per model/method/image/metric/protocol, see
:mod:`.store`), ``shards/`` (per-process files of sharded runs), ``logs/bench*.log``, ``results.md``,
``results.csv`` and ``report.html`` (see :mod:`.report`). Running the same command again resumes:
only missing maps and rows are computed.
"""
from .config import BenchConfig, MethodSpec, build_config
from .report import write_report
from .runner import run_bench

__all__ = ["BenchConfig", "MethodSpec", "build_config", "run_bench", "write_report"]
