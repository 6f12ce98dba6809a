"""How many occluded images go into one forward pass: memory accounting from the clean
pass, the budget-based size, and timing trials of candidate sizes. Shared by occlusion and
the perturbation family (:mod:`cnnviz_fast.attribution.perturbation`)."""
from __future__ import annotations

import contextlib
import math
import time
from typing import Callable, Dict, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ...core import target_scores
from ...core.targets import Target
from ...core.validation import check_positive_int

__all__ = [
    "ACTIVATION_COPIES", "CPU_MEMORY_BUDGET", "CUDA_FREE_FRACTION", "MAX_MEASURED_BUDGET", "MEASURED_BATCH_SIZES",
    "choose_batch_size", "clean_pass", "time_batch_sizes",
]

# On CPU, forward passes stop getting faster per image once a batch's activations are
# a few tens of MiB (they fall out of cache); measured on ResNet-18 and the digits CNN.
CPU_MEMORY_BUDGET = 64 * 2**20
# On CUDA, use at most this fraction of the memory that is free when the call starts.
CUDA_FREE_FRACTION = 0.5
# Live activations per image during an inference forward pass, in units of the largest
# layer output: a layer's input and output, plus a skip connection held alongside.
ACTIVATION_COPIES = 3
# Full recomputation without a batch size or budget times these batch sizes (occluded
# images per pass, up to MAX_MEASURED_BUDGET bytes) on its first passes and keeps the fastest.
MEASURED_BATCH_SIZES = (8, 16, 32, 64, 128)
MAX_MEASURED_BUDGET = 2**30


def choose_batch_size(bytes_per_image: int, device: torch.device, memory_budget: Optional[int] = None) -> int:
    """Occluded images per forward pass: as many as fit in ``memory_budget`` bytes at
    ``bytes_per_image`` each (at least 1).

    Default budget: 64 MiB on CPU, half of the free memory (including memory cached but
    unused by PyTorch's allocator) on CUDA.
    """
    if memory_budget is None:
        device = torch.device(device)
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
            memory_budget = int(CUDA_FREE_FRACTION * (free + cached))
        else:
            memory_budget = CPU_MEMORY_BUDGET
    check_positive_int(memory_budget, "memory_budget")
    return max(1, memory_budget // max(1, int(bytes_per_image)))


def time_batch_sizes(run_pass: Callable[[int, int], None], candidates, limit: int, device,
                     stop_when_slower: bool = False) -> Tuple[Dict[int, float], int]:
    """Consecutive first passes, one timed per candidate size, while they cover at most
    ``limit`` positions (``stop_when_slower``: also stop after a size slower per position
    than the best so far). The very first pass runs untimed: it also pays one-time costs
    (allocations, caches), which made the best size look slowest on EfficientNet-Lite0.
    ``run_pass(first, size)`` runs one. Returns ``({size: seconds per position}, positions
    done)``."""
    seconds: Dict[int, float] = {}
    first = 0
    for index, size in enumerate(candidates):
        if first + size * (2 if index == 0 else 1) > limit:
            break
        if index == 0:
            run_pass(first, size)
            first += size
        start = time.perf_counter()
        run_pass(first, size)
        if device.type == "cuda":  # time the work, not its launch
            torch.cuda.synchronize(device)
        seconds[size] = (time.perf_counter() - start) / size
        first += size
        if stop_when_slower and seconds[size] > min(seconds.values()):
            break
    return seconds, first


def clean_pass(model: nn.Module, inputs: Tensor, target: Target, keep_output: bool, measure: bool):
    """``(scores, output or None, bytes per image or None)`` from one forward pass on the
    clean inputs: the target scores, the model output when kept, and (``measure``) the
    estimated memory one more image adds to a forward pass: its occluded copy plus
    ``ACTIVATION_COPIES`` times the largest tensor an operator of this forward pass makes
    (:class:`_LargestTensor`)."""
    with _LargestTensor() if measure else contextlib.nullcontext() as largest:
        if keep_output:
            scores, output = target_scores(model, inputs, target, keep_output=True)
        else:
            scores, output = target_scores(model, inputs, target), None
    if not measure:
        return scores, output, None
    n = inputs.shape[0]
    return scores, output, inputs.nbytes // n + ACTIVATION_COPIES * math.ceil(largest.nbytes / n)


class _LargestTensor(TorchDispatchMode):
    """Records the size of the largest tensor any operator of the forward pass produces.
    A dispatch mode sees every operator whatever the model format (eager, TorchScript,
    torch.compile, torch.export), where module hooks do not run in all of them."""

    def __init__(self):
        super().__init__()
        self.nbytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, Tensor):
                self.nbytes = max(self.nbytes, t.nbytes)
        return out
