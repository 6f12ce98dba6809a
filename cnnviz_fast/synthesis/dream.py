"""DeepDream (Mordvintsev et al. 2015): amplify whatever a layer already sees.

The objective is ``½ ||A||²`` of the layer's activation ``A``, whose gradient with
respect to ``A`` is ``A`` itself (the lecture's "set the gradient equal to the
activation"). Steps are normalised (divided by the mean absolute gradient), the image
is jittered on every step, and the work runs over octaves: from a downscaled copy to
full size, carrying the details dreamt at each scale to the next.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core import autograd_on, model_guard
from ..core.validation import check_int, check_layer_name, check_number, model_device_dtype
from ._common import check_normalize, check_pixels, make_generator, probe
from .engine import Objective, SynthesisResult, optimize
from .parameterization import PixelImage
from .regularizers import Jitter


def deep_dream(
    model: nn.Module,
    pixels: Tensor,
    layer: str,
    *,
    normalize: Optional[nn.Module] = None,
    steps: int = 20,
    lr: float = 0.01,
    octaves: int = 3,
    octave_scale: float = 1.4,
    jitter: Optional[int] = None,
    seed: Optional[int] = 0,
    progress: Optional[bool] = None,
    callback=None,
) -> SynthesisResult:
    """Dream ``pixels`` at ``layer``.

    Args:
        model: any network; layer: dotted module name (the forward stops there).
        pixels: ``Tensor[N, C, H, W]`` in [0, 1] (the model sees ``normalize(pixels)``).
        normalize: pixels → model inputs (a :class:`~cnnviz_fast.core.Normalize`) or None.
        steps: gradient steps per octave; lr: step length as the mean absolute change of
            a pixel per step (the gradient is divided by its mean absolute value).
        octaves: number of scales; octave_scale: size ratio between consecutive scales
            (the smallest is ``H / octave_scale^(octaves-1)``, at least 8 pixels or the
            image's size); the result has the input's size.
        jitter: random shift per step in pixels (default ``min(H, W) // 16``, at least 1).
        seed: the jitter; progress, callback: as in :func:`optimize`.

    Returns:
        :class:`SynthesisResult`: ``images`` ``Tensor[N, C, H, W]`` in [0, 1];
        ``history`` ``Tensor[octaves * steps, N]`` of ``-½||A||²``. The model runs in eval
        mode for the call and is left as it was; only the image gets gradients.
    """
    with model_guard(model), autograd_on():
        device, dtype = model_device_dtype(model)
        check_layer_name(layer)
        pixels = check_pixels(pixels, "pixels", device, dtype)
        normalize = check_normalize(normalize, pixels.shape[1])
        probe(model, normalize(pixels), "pixels", layers=[layer])
        check_int(octaves, "octaves", minimum=1)
        octave_scale = check_number(octave_scale, "octave_scale", minimum=1.0)
        height, width = pixels.shape[-2:]
        jitter = max(1, min(height, width) // 16) if jitter is None else jitter
        generator = make_generator(seed)

        def loss(features, output, index):
            return -0.5 * features[layer].flatten(1).pow(2).sum(1)

        objective = Objective(loss=loss, layers=(layer,))
        def scaled(length: int, k: int) -> int:  # at least 8 pixels, never more than the image
            return min(length, max(8, round(length / octave_scale ** k)))

        sizes = [(scaled(height, k), scaled(width, k)) for k in reversed(range(octaves))]  # the last: (H, W)
        detail = pixels.new_zeros(pixels.shape[:2] + sizes[0])  # what dreaming added, carried up the octaves
        histories = []
        for size in sizes:
            base = F.interpolate(pixels, size=size, mode="bilinear", align_corners=False, antialias=True)
            detail = F.interpolate(detail, size=size, mode="bilinear", align_corners=False)
            result = optimize(model, objective, PixelImage(base + detail), normalize=normalize, steps=steps,
                              lr=lr, optimizer="sgd", step_norm="mean_abs", transforms=[Jitter(jitter)],
                              generator=generator, progress=progress, callback=callback,
                              description=f"deep_dream {size[0]}x{size[1]}")
            detail = result.images - base
            histories.append(result.history)
        return SynthesisResult(images=result.images, history=torch.cat(histories))
