"""Window scores from the incremental engine (:mod:`.incremental`): per image its clean
pass through the traced graph (checked against the model's score), then batches of window
positions, their size and (on the CPU) the engine's layout chosen by timing the first
passes. Gives up (:class:`Fallback`) when the plan cannot be trusted or saves too little."""
from __future__ import annotations

import time
from typing import Callable, Optional

import torch
from torch import Tensor

from ...ops.reference import occlusion_window_bounds
from .batching import time_batch_sizes
from .full import Scorer, baseline_rows
from .incremental import IncrementalOcclusion

__all__ = [
    "INCREMENTAL_BATCH", "INCREMENTAL_BATCH_SIZES", "Fallback", "Unprofitable", "image_target", "incremental_scorer",
]

# Window positions per pass of the incremental engine: without batch_size, on the CPU the
# fastest of INCREMENTAL_BATCH_SIZES timed on the first passes (at most a quarter of an
# image's positions), on a GPU INCREMENTAL_BATCH. The best CPU size depends on the model:
# small passes suited EfficientNet-Lite0's depthwise layers, ResNet-18 hardly changed. On
# an H200, VGG-16 exact took 0.26 s with trial passes (16 positions, rectangles on the
# device) and 0.055 s at 128 with rectangles on the host: the passes are launch-bound.
INCREMENTAL_BATCH = 128
INCREMENTAL_BATCH_SIZES = (16, 32, 64, 128)


class Fallback(Exception):
    """The incremental plan is not used for this call (see incremental_scorer)."""


class Unprofitable(Fallback):
    """The incremental plan saves too little arithmetic (entry.PROFITABLE_FRACTION)."""


def incremental_scorer(engine: IncrementalOcclusion, inputs: Tensor, base: Tensor, scores: Tensor, target,
                       window, stride, batch_size: Optional[int], profitable_fraction: float) -> Scorer:
    """Deltas of image ``n`` at some positions from the incremental engine. Raises
    Fallback when the traced graph does not reproduce the model's clean score (a trace
    that missed something), Unprofitable when its first batch's multiply-adds exceed
    ``profitable_fraction`` of those of full passes for the same positions."""
    N, C, H, W = inputs.shape
    bounds = occlusion_window_bounds(H, W, window, stride)  # on the host, as the engine wants them
    # on a GPU bigger batches only help; on the CPU the best size depends on the model
    state = {"image": None, "checked": False,
             "batch": batch_size or (INCREMENTAL_BATCH if inputs.device.type != "cpu" else None)}

    def run(chunk: Tensor) -> Tensor:
        out = engine.scores(*(b[chunk] for b in bounds))
        if not state["checked"]:
            if engine.macs_incremental > profitable_fraction * engine.positions * engine.macs_clean:
                raise Unprofitable
            state["checked"] = True
        return out

    def score(n: int, positions: Tensor) -> Tensor:
        if state["image"] != n:
            clean = engine.clean(inputs[n:n + 1], baseline_rows(base, n, n + 1), image_target(target, n))
            clean = clean.to(scores.dtype)  # under autocast: a 16-bit score
            if clean.shape != (1,) or not torch.allclose(clean, scores[n:n + 1], rtol=1e-3, atol=1e-5):
                raise Fallback
            state["image"] = n
        positions = positions.cpu()
        out, first = [], 0
        if state["batch"] is None:  # time the candidate sizes on the first passes
            seconds, first = time_batch_sizes(lambda start, size: out.append(run(positions[start:start + size])),
                                              INCREMENTAL_BATCH_SIZES, len(positions) // 4, inputs.device)
            state["batch"] = min(seconds, key=seconds.get) if seconds else INCREMENTAL_BATCH
            if seconds and inputs.device.type == "cpu":
                first = _choose_engine_layout(engine, lambda chunk: out.append(run(chunk)), positions, first,
                                              state["batch"], seconds[state["batch"]])
        out += [run(chunk) for chunk in positions[first:].split(state["batch"])]
        return scores[n] - torch.cat(out).to(scores.dtype)  # a 0-dim minuend would not promote
    return score


def _choose_engine_layout(engine: IncrementalOcclusion, run_chunk: Callable[[Tensor], None], positions: Tensor,
                          first: int, size: int, contiguous_seconds: float) -> int:
    """On the CPU, whether the engine's whole-map layers run channels-last: kept if a timed
    pass of ``size`` positions (after an untimed one, which pays oneDNN's set-up for the
    layout) beats ``contiguous_seconds`` per position: which layout wins depends on the
    network. Both passes score real positions; returns how many are done."""
    if len(positions) - first < 2 * size:
        return first
    engine.channels_last = True
    run_chunk(positions[first:first + size])
    start = time.perf_counter()
    run_chunk(positions[first + size:first + 2 * size])
    engine.channels_last = (time.perf_counter() - start) / size < contiguous_seconds
    return first + 2 * size


def image_target(target, n: int):
    """Image ``n``'s target for passes over copies of that image only."""
    if isinstance(target, (list, tuple, Tensor)):
        return int(torch.as_tensor(target)[n])
    return target
