"""RISE (Petsiuk et al. 2018): the saliency of a pixel is the average target score of
randomly masked inputs, weighted by how much each mask shows the pixel.

The masks are never stored: :func:`cnnviz_fast.ops.rise_mask` builds each batch of masked
inputs from a seed inside one kernel (mask ``m`` depends only on ``(seed, m)``) and
:func:`cnnviz_fast.ops.rise_accumulate` regenerates them to sum the score-weighted masks, so
memory is one batch whatever the number of masks.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
from torch import Tensor, nn

from ... import ops
from ...core import autograd_on, model_guard
from ...core.arguments import friendly_arguments
from ...core.targets import Target, is_predicted, resolve_target
from ...core.validation import check_int, check_pair, check_positive_int
from .._backprop import detach_output, prepare_inputs, with_output
from ._chunks import batch_rows, clean_pass, perturbed_scores, scoring_model

__all__ = ["rise"]


@friendly_arguments
def rise(model: nn.Module, inputs: Tensor, target: Target, masks: int = 4000,
         grid: Union[int, Tuple[int, int]] = 7, p: float = 0.5, seed: Optional[int] = None,
         batch_size: Optional[int] = None, memory_budget: Optional[int] = None, return_output: bool = False):
    """RISE saliency: ``sum_m score(x * M_m) M_m / (masks * p)``.

    Each mask ``M_m`` is a ``grid`` of cells, each on with probability ``p``, upsampled
    bilinearly to ``(grid + 1) * ceil(size / grid)`` pixels and cropped at a random shift
    (the paper's masks; :func:`cnnviz_fast.ops.rise_masks` shows them). The score is the
    target's (a logit for an int target; pass a callable such as ``lambda out:
    out.softmax(1)[:, k]`` for the paper's probabilities). The same masks serve every image.

    Args:
        model: the network; run in eval mode for the call, restored afterwards.
        inputs: ``Tensor[N, C, H, W]``.
        target: an int, N ints, a :class:`~cnnviz_fast.Neuron`, a callable ``output ->
            Tensor[B]`` (it sees the masked batches) or ``"predicted"``.
        masks: number of random masks (>= 1).
        grid: cells ``(grid_h, grid_w)`` or an int, at most the image size.
        p: probability in (0, 1) of a cell being on.
        seed: the masks' seed (any int); default: drawn from torch's global generator.
        batch_size: masked inputs per forward pass (the result does not depend on it).
            Default: as many as fit in ``memory_budget`` when it is given, else the fastest
            of 8, 16, 32, 64 timed on the first passes (CPU) or what fits in half the free
            memory (CUDA).
        memory_budget: bytes per pass when ``batch_size`` is None (default 64 MiB on CPU,
            half the free memory on CUDA).
        return_output: also return the model's output on the clean inputs.

    Returns:
        ``Tensor[N, H, W]`` in the scores' dtype, with ``return_output`` ``(saliency, output)``.
    """
    check_positive_int(masks, "masks")
    grid = check_pair(grid, "grid")
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p < 1:
        raise ValueError(f"p must be a number in (0, 1) (the probability of a cell being on), got {p!r}")
    if seed is None:
        seed = int(torch.randint(0, 2**62, ()).item())
    check_int(seed, "seed")
    with model_guard(model), autograd_on(), torch.no_grad():
        x = prepare_inputs(inputs, target, copy=True, model=model)
        N, C, H, W = x.shape
        if grid[0] > H or grid[1] > W:
            raise ValueError(f"grid {grid} must not exceed the image size ({H}, {W})")
        keep = return_output or is_predicted(target)
        clean = clean_pass(model, x.clone(), target, keep)
        target = resolve_target(target, clean.output)
        rows = batch_rows(batch_size, memory_budget, clean.bytes_per_image, x.device, masks)

        def masked(n: int):
            return lambda first, count: ops.rise_mask(x[n:n + 1], seed, grid, p, first, count)[0]

        runner = scoring_model(model, x, target, clean.scores)
        scores = torch.stack([perturbed_scores(runner, target, n, masks, rows, masked(n)) for n in range(N)])
        saliency = ops.rise_accumulate(scores, H, W, seed, grid, p) / (masks * p)
        output = detach_output(clean.output) if return_output else None
    return with_output(saliency, output, return_output)
