"""Feature inversion (Mahendran & Vedaldi 2015): an image whose features at a layer
match those of a given image, under total-variation and α-norm priors. What can be
recovered shows what the layer keeps of its input."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor, nn

from ..core import autograd_on, forward_to_layers, model_guard
from ..core.validation import check_layer_name, check_number, model_device_dtype
from ._common import check_normalize, check_pixels, make_generator, probe
from .engine import Objective, SynthesisResult, optimize
from .parameterization import make_image
from .regularizers import AlphaNorm, TotalVariation


@dataclass
class InversionResult(SynthesisResult):
    """``images``: reconstructions ``Tensor[N, C, H, W]`` in [0, 1];
    ``relative_error``: ``Tensor[N]``, ``||Φ(x̂) - Φ(x)|| / ||Φ(x)||`` at ``layer``."""

    relative_error: Tensor = field(default=None)


def invert_features(
    model: nn.Module,
    pixels: Tensor,
    layer: str,
    *,
    normalize: Optional[nn.Module] = None,
    steps: int = 200,
    lr: float = 0.05,
    optimizer: str = "adam",
    parameterization: str = "pixels",
    tv: float = 0.05,
    tv_beta: float = 2.0,
    alpha_norm: float = 0.01,
    alpha: float = 6.0,
    center=0.5,
    seed: Optional[int] = 0,
    progress: Optional[bool] = None,
    callback=None,
) -> InversionResult:
    """Reconstruct ``pixels`` from their activations at ``layer``.

    Minimises, per image, ``||Φ(x̂) - Φ(x)||² / ||Φ(x)||² + tv * TV_β(x̂) + alpha_norm *
    mean(|x̂ - center|^alpha)`` from a grey image with a little noise; the forward pass
    stops at ``layer``.

    Args:
        model: any network.
        pixels: ``Tensor[N, C, H, W]`` in [0, 1] (the model sees ``normalize(pixels)``).
        layer: dotted module name.
        normalize: pixels → model inputs (a :class:`~cnnviz_fast.core.Normalize`) or None.
        steps, lr, optimizer (``"adam"``, ``"sgd"``, ``"lbfgs"``), parameterization
        (``"pixels"`` or ``"fourier"``): the optimisation.
        tv, tv_beta, alpha_norm, alpha, center: the priors' weights and shapes.
        seed: initialisation noise; progress, callback: as in :func:`optimize`.

    Returns:
        :class:`InversionResult`. The model runs in eval mode for the call and is left as
        it was; only the image gets gradients.
    """
    with model_guard(model), autograd_on():
        device, dtype = model_device_dtype(model)
        check_layer_name(layer)
        pixels = check_pixels(pixels, "pixels", device, dtype)
        normalize = check_normalize(normalize, pixels.shape[1])

        target = probe(model, normalize(pixels), "pixels", layers=[layer])[layer].detach()
        target_norm = target.flatten(1).pow(2).sum(1).clamp_min(1e-12)

        def loss(features, output, index):
            return (features[layer] - target[index]).flatten(1).pow(2).sum(1) / target_norm[index]

        penalties = []
        if tv:
            penalties.append(TotalVariation(check_number(tv, "tv"), tv_beta))
        if alpha_norm:
            penalties.append(AlphaNorm(check_number(alpha_norm, "alpha_norm"), alpha, center))
        generator = make_generator(seed)
        image = make_image(parameterization, pixels.shape, generator=generator, device=device, dtype=dtype,
                           center=center, init_std=0.05)
        result = optimize(model, Objective(loss=loss, layers=(layer,)), image, normalize=normalize, steps=steps,
                          lr=lr, optimizer=optimizer, penalties=penalties, generator=generator,
                          progress=progress, callback=callback, description="invert_features")
        with torch.no_grad():
            features = forward_to_layers(model, normalize(result.images.clone()), [layer])[layer]
        error = (features - target).flatten(1).norm(dim=1) / target_norm.sqrt()
        return InversionResult(images=result.images, history=result.history, relative_error=error)
