"""Shard files of sharded runs (``OUT/shards/results.shard-I-of-N.sqlite``, one per process) and their
merging into the folder's database (``OUT/results.sqlite``).

Merging is an idempotent ``INSERT OR IGNORE`` of every row (``meta``: ``INSERT OR REPLACE``), one
transaction per shard file; a shard file written by an earlier release is migrated when it is opened
(:func:`.schema.connect`), and the rows are copied by column name, so files of either layout merge.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from .schema import TABLES, Transaction, columns, connect, resolve_errors
from .store import MAIN_DB

#: the folder of the shard files, inside the output folder
SHARD_DIR = "shards"


def shard_suffix(index: int, count: int) -> str:
    """The name part of shard ``index`` of ``count`` (``.shard-0-of-2``)."""
    return f".shard-{index}-of-{count}"


def shard_path(out: Path, index: int, count: int) -> Path:
    """The database file of shard ``index`` of ``count`` in output folder ``out``."""
    return Path(out) / SHARD_DIR / f"results{shard_suffix(index, count)}.sqlite"


def merge_into(main: Path, shards: Sequence[Path], remove: bool = True) -> int:
    """Copy every row of the shard databases into ``main`` (``INSERT OR IGNORE``, one transaction per
    shard); delete each shard file after its rows are committed. Returns the number of shards merged."""
    con = connect(main)
    n = 0
    try:
        for s in shards:
            s = Path(s)
            if not s.exists() or s.resolve() == Path(main).resolve():
                continue
            connect(s).close()  # checkpoint-safe open: creates missing tables, migrates an old layout
            con.execute("ATTACH DATABASE ? AS shard", (str(s),))
            try:
                with Transaction(con) as c:
                    for t in TABLES:
                        have = set(columns(c, t, "shard"))
                        cols = ", ".join(k for k in columns(c, t) if k in have)
                        verb = "INSERT OR REPLACE" if t == "meta" else "INSERT OR IGNORE"
                        c.execute(f"{verb} INTO main.{t} ({cols}) SELECT {cols} FROM shard.{t}")
            finally:
                con.execute("DETACH DATABASE shard")
            n += 1
            resolve_errors(con)
            if remove:
                for suffix in ("", "-wal", "-shm"):
                    p = Path(str(s) + suffix)
                    if p.exists():
                        p.unlink()
    finally:
        con.close()
    return n


def merge_shards(out: Path, remove: bool = False) -> int:
    """Merge ``out/shards/*.sqlite`` into ``out/results.sqlite``. Shard files are kept unless ``remove``
    (only safe when no process still writes to them, e.g. after the torchrun barrier)."""
    shards = sorted((Path(out) / SHARD_DIR).glob("results.shard-*.sqlite"))
    return merge_into(Path(out) / MAIN_DB, shards, remove=remove) if shards else 0
