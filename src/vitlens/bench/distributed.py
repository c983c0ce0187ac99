"""Sharding over torchrun ranks and ``--shard i/n``.

Launched by ``torchrun`` (``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` set), each rank joins a process group
(``gloo`` on the CPU, ``nccl`` on CUDA) used only for the final barrier, computes its share of the images
and writes its own database file; rank 0 then merges the files and writes the report.

The unit of sharding is the *batch* (``batch_size`` consecutive images of the selected list): batch
``k`` belongs to shard ``k mod n``. Every image therefore meets the same batch-mates whatever the
number of processes, so seeded methods and metrics give the same numbers in 1 or K processes.
``--shard i/n`` composes with torchrun: the effective shard is ``i * world + rank`` of ``n * world``.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Optional

from ..errors import InputError


@dataclass
class ShardInfo:
    index: int       # this process's shard
    count: int       # number of shards
    rank: int        # torchrun rank (0 without a launcher)
    world: int       # torchrun world size (1 without a launcher)
    local_rank: int

    @property
    def sharded(self) -> bool:
        return self.count > 1

    def owns(self, batch_index: int) -> bool:
        return batch_index % self.count == self.index


def parse_shard(spec: Optional[str]) -> tuple[int, int]:
    """``"i/n"`` -> (i, n) with 0 <= i < n."""
    if not spec:
        return 0, 1
    try:
        i, n = (int(v) for v in str(spec).split("/"))
    except ValueError:
        raise InputError(f"--shard must look like i/n (e.g. 0/4), got '{spec}'.") from None
    if not (n >= 1 and 0 <= i < n):
        raise InputError(f"--shard {spec}: need 0 <= i < n.")
    return i, n


def shard_info(spec: Optional[str] = None) -> ShardInfo:
    i, n = parse_shard(spec)
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", rank))
    return ShardInfo(index=i * world + rank, count=n * world, rank=rank, world=world, local_rank=local)


def init(info: ShardInfo, device_type: str) -> bool:
    """Join the torchrun process group (returns whether one was created)."""
    if info.world <= 1:
        return False
    import torch.distributed as dist

    if dist.is_initialized():
        return False
    backend = "nccl" if device_type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(hours=48))
    return True


def barrier(info: ShardInfo) -> None:
    if info.world <= 1:
        return
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def finish(created: bool) -> None:
    if created:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
