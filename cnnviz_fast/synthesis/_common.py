"""Argument handling shared by the synthesis methods."""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor, nn

from ..core import Normalize, check_images, forward_to_layers
from ..core.validation import check_int, check_model_dtype


def make_generator(seed: Optional[int]) -> torch.Generator:
    """A CPU generator for every random draw of a call (initialisation and transforms),
    so the same seed gives the same images on any device; None draws a fresh seed."""
    if seed is None:
        seed = int(torch.randint(0, 2 ** 62, (1,)))
    check_int(seed, "seed")
    return torch.Generator().manual_seed(seed)


def identity(pixels: Tensor) -> Tensor:
    """``normalize=None``: the model takes pixels."""
    return pixels


def check_normalize(normalize: Optional[nn.Module], channels: int) -> Callable[[Tensor], Tensor]:
    """``normalize`` must be None (the identity, returned as :func:`identity`) or a module
    mapping pixels to model inputs; a :class:`Normalize` must have 1 or ``channels`` channels."""
    if normalize is None:
        return identity
    if not callable(normalize):
        raise ValueError(f"normalize must be a Normalize (or a callable pixels -> model inputs) or None, "
                         f"got {type(normalize).__name__}")
    if isinstance(normalize, Normalize) and normalize.channels not in (1, channels):
        raise ValueError(f"normalize has {normalize.channels} channels but the images have {channels}")
    return normalize


def neutral_pixel(normalize: Optional[nn.Module], center) -> object:
    """The pixel value penalties and clipping pull towards: ``center`` if given, else the
    normalisation mean (the model's zero input), else 0.5."""
    if center is not None:
        return center
    if isinstance(normalize, Normalize):
        return normalize.mean.flatten().tolist()
    return 0.5


def check_pixels(images, argument: str, device, dtype) -> Tensor:
    """A Tensor[N, C, H, W] of pixels in [0, 1], as a private contiguous copy on the model's
    device and dtype: the caller's tensor is never handed to the model (a model that writes
    into its input cannot change it), an inference tensor becomes an ordinary one, and
    parameters made from it are contiguous (L-BFGS views their gradients flat). Pixels of
    another dtype than the model's are refused, never converted."""
    check_images(images, argument)
    check_model_dtype(images, dtype, argument)
    if bool((images < 0).any()) or bool((images > 1).any()):
        raise ValueError(f"{argument} must be pixels in [0, 1] (before normalisation), got values in "
                         f"[{float(images.min()):.3g}, {float(images.max()):.3g}]")
    return images.detach().to(device, dtype).clone(memory_format=torch.contiguous_format)


def check_class_output(output, n: int, method: str) -> Tensor:
    """``output`` if it is class scores ``Tensor[n, classes]``; else a ValueError naming the model."""
    if not isinstance(output, Tensor) or output.dim() != 2 or output.shape[0] != n:
        got = f"shape {tuple(output.shape)}" if isinstance(output, Tensor) else type(output).__name__
        raise ValueError(f"{method} needs a model whose output is class scores Tensor[N, classes], got {got}; "
                         "wrap the model so that it returns them")
    return output


def probe(model: nn.Module, inputs: Tensor, argument: str, layers=None, layer_argument: str = "layer"):
    """``model(inputs)`` (or the activations of ``layers``) without gradients. An error the
    model raises is the model's own (its type, message and traceback), with a note saying
    which argument it ran on. The model gets a copy: ``inputs`` are used again afterwards,
    so a model writing into its input must not change them."""
    try:
        with torch.no_grad():
            if layers is None:
                return model(inputs.clone())
            return forward_to_layers(model, inputs.clone(), layers, argument=layer_argument)
    except ValueError:
        raise  # ours, naming its argument (a layer that does not exist, ...)
    except Exception as error:
        error.add_note(f"(raised by the model on {argument} of shape {tuple(inputs.shape)})")
        raise
