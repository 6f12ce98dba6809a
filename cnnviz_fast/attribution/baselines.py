"""Control attributions: what a faithfulness metric's floor looks like."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ..core import model_guard
from ..core.arguments import friendly_arguments
from ..core.validation import check_images
from ._backprop import detach_output, with_output

__all__ = ["random_attribution"]


@friendly_arguments
def random_attribution(model: nn.Module, inputs: Tensor, target=None, seed: Optional[int] = None,
                       return_output: bool = False):
    """Uniform random maps ``Tensor[N, H, W]`` in [0, 1): a method that knows nothing, the
    floor every method should beat in deletion / insertion curves. ``target`` is accepted
    for the common calling convention and ignored; with ``return_output`` the model runs
    once (eval mode) for its output. ``seed`` makes the maps repeatable, independent of
    the global generator."""
    check_images(inputs, "inputs")
    generator = None
    if seed is not None:
        generator = torch.Generator(device=inputs.device).manual_seed(int(seed))
    maps = torch.rand(inputs.shape[0], *inputs.shape[2:], device=inputs.device, generator=generator)
    output = None
    if return_output:
        with model_guard(model), torch.no_grad():
            output = detach_output(model(inputs), clone=False)
    return with_output(maps, output, return_output)
