"""torch.distributed helpers (torchrun): process group, rank, sharding and reductions.

Under ``torchrun --nproc_per_node=N`` every stage runs on every rank: whole batches
are sharded (rank r takes batches r, r + N, r + 2N, ...: every image once, no
padding, and each batch holds the same images as in a single process, so every
activation is bitwise the one a single process computes), statistics and counts
are all-reduced, and only rank 0 writes files and prints tables. Reductions of CPU tensors go through a gloo group, so they work
with the NCCL backend as well. Without torchrun (or with one process) every helper
is the identity.
"""
from __future__ import annotations

import datetime
import hashlib
import os
from typing import Any, List, Optional

import torch
import torch.distributed as dist

_cpu_group = None


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if world_size() > 1 else 0


def is_main() -> bool:
    return rank() == 0


def init_from_env(device_type: Optional[str] = None) -> int:
    """Join the process group torchrun (or a submitit SLURM job) describes; returns the world size.

    NCCL on GPUs, gloo on CPUs. A no-op without WORLD_SIZE > 1 or when already initialised."""
    global _cpu_group
    if "WORLD_SIZE" not in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1 \
            and "SUBMITIT_EXECUTOR" in os.environ:  # a submitit SLURM job with one task per GPU
        import submitit
        submitit.helpers.TorchDistributedEnvironment().export()
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1 or dist.is_initialized():
        return world_size()
    use_cuda = torch.cuda.is_available() if device_type is None else device_type == "cuda"
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(minutes=30))
    _cpu_group = dist.new_group(backend="gloo") if use_cuda else None
    return world_size()


def shutdown() -> None:
    global _cpu_group
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _cpu_group = None


def shard(items: List[Any]) -> List[Any]:
    """This rank's share of ``items`` (batches): items rank, rank + world, ..."""
    return items[rank()::world_size()]


def shard_batches(n: int, batch_size: int) -> List[List[int]]:
    """This rank's batches of the indices 0..n-1 cut into consecutive batches (a DataLoader batch_sampler)."""
    return shard([list(range(i, min(i + batch_size, n))) for i in range(0, n, batch_size)])


def all_reduce(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Sum or max of ``tensor`` over ranks (a CPU tensor; returned, and updated in place)."""
    if world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX, group=_cpu_group)
    return tensor


def all_gather_object(obj: Any) -> List[Any]:
    if world_size() <= 1:
        return [obj]
    out: List[Any] = [None] * world_size()
    dist.all_gather_object(out, obj, group=_cpu_group)
    return out


def check_same(text: str, what: str) -> None:
    """Stop every rank with one message when the ranks disagree on ``text`` (e.g. the composed config)."""
    digests = all_gather_object(hashlib.sha256(text.encode()).hexdigest())
    differ = [r for r, d in enumerate(digests) if d != digests[0]]
    if differ:
        raise ValueError(f"ranks disagree on the {what}: rank(s) {', '.join(map(str, differ))} differ from rank 0; "
                         f"start every rank with the same command and files")
