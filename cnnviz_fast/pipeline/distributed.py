"""torchrun support: join the job, know the rank, wait for the others, add up counts.

Shard k of the run goes to rank ``k % world_size``: deterministic, and independent of the
world size used by earlier attempts (a resumed run may use another number of ranks).
"""
from __future__ import annotations

import os
from typing import List, Tuple

import torch
from torch import distributed as dist


def init_distributed() -> Tuple[int, int, torch.device]:
    """Join the ``torchrun`` job described by the environment (no-op outside one).

    Returns ``(rank, world_size, device)``: nccl and ``cuda:LOCAL_RANK`` when GPUs exist,
    else gloo and the CPU. Multi-node jobs use torchrun's rendezvous as usual.
    """
    if "WORLD_SIZE" in os.environ and dist.is_available() and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    return rank_world() + (device,)


def rank_world() -> Tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def barrier() -> None:
    if rank_world()[1] > 1:
        dist.barrier()


def all_sum(values: List[float]) -> List[float]:
    """Element-wise sum over ranks (the values themselves outside a job)."""
    if rank_world()[1] == 1:
        return list(values)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def all_max(values: List[float]) -> List[float]:
    if rank_world()[1] == 1:
        return list(values)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.tolist()
