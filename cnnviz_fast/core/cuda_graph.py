"""A call captured in a CUDA graph per static key (input shape, dtype, target), then replayed.

At batch 1 a call is bound by the host: launching a ResNet-18 forward + backward kernel by
kernel costs more than running it. A CUDA graph launches the whole recorded call at once.
What a graph fixes at capture: the input and output memory (inputs are copied into a
static buffer, outputs cloned out of the graph's), every kernel's arguments (an int target,
the layer, the shapes) and every decision made on the host. So only functions without host
reads, host-side randomness or data-dependent control flow can be captured; a capture that
fails becomes a ``ValueError``.
"""
from __future__ import annotations

from typing import Callable, Dict, Hashable, Tuple

import torch
from torch import Tensor
from torch.utils._pytree import tree_map

__all__ = ["GraphedCall"]

WARMUP_CALLS = 2  # eager calls on a side stream before capture (cuDNN / cuBLAS set-up, lazy init)


def _clone(value):
    return tree_map(lambda t: t.clone() if isinstance(t, Tensor) else t, value)


class GraphedCall:
    """``call(inputs, key, run)``: ``run(static_inputs)`` captured once per ``(shape, dtype,
    key)`` and replayed with ``inputs`` copied in; returns clones of its outputs.

    ``name`` names the function in errors. The graphs share one memory pool. Not for
    concurrent use: the caller serialises calls (the Explainer holds the model's lock)."""

    def __init__(self, name: str):
        self.name = name
        self.graphs: Dict[Hashable, Tuple[Tensor, torch.cuda.CUDAGraph, object]] = {}
        self.pool = None

    def __call__(self, inputs: Tensor, key: Hashable, run: Callable[[Tensor], object]):
        full_key = (tuple(inputs.shape), inputs.dtype, inputs.device, key)
        entry = self.graphs.get(full_key)
        if entry is None:
            entry = self.graphs[full_key] = self._capture(inputs, run)
        static_inputs, graph, static_outputs = entry
        static_inputs.copy_(inputs)
        graph.replay()
        return _clone(static_outputs)

    def _capture(self, inputs: Tensor, run: Callable[[Tensor], object]):
        static_inputs = inputs.clone()
        side = torch.cuda.Stream(device=inputs.device)
        side.wait_stream(torch.cuda.current_stream(inputs.device))
        with torch.cuda.stream(side):
            for _ in range(WARMUP_CALLS):  # eager: bad inputs raise their ValueError here
                run(static_inputs)
        torch.cuda.current_stream(inputs.device).wait_stream(side)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                static_outputs = run(static_inputs)
        except RuntimeError as error:
            raise ValueError(f"{self.name} could not be captured in a CUDA graph ({str(error).splitlines()[0]}); "
                             "use cuda_graph=False") from error
        return static_inputs, graph, static_outputs
