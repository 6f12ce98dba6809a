"""The rule that picks a layer when a method needs one and the caller gives none."""
from __future__ import annotations

import threading
import weakref
from typing import List, Optional, Tuple

import torch
from torch import nn

from ..core import model_guard

# Rectifiers and other pointwise activations: their outputs are what a CAM usually explains.
ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Hardswish, nn.Mish, nn.Hardtanh,
               nn.Sigmoid, nn.Tanh, nn.PReLU, nn.SELU, nn.CELU)
DEFAULT_LAYER_RULE = ("the last layer with a spatial feature map (h, w > 1): among activation modules when "
                      "the model has at least three, else convolutions, else any 4-D output")

_CACHE: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()
_CACHE_LOCK = threading.Lock()


def candidate_layers(model: nn.Module, inputs: torch.Tensor) -> List[Tuple[str, Tuple[int, ...]]]:
    """``(name, output shape)`` of the layers with image-shaped outputs, in execution order:
    the activation modules when the model has at least three, else its convolutions, else
    every module with a 4-D output. Empty for models that take no hooks (TorchScript).
    One forward pass of the first image, under ``no_grad``; hooks removed after."""
    shapes, kinds, handles = {}, {}, []

    def hook(name, module):
        def record(_, args, output):
            if name not in shapes and isinstance(output, torch.Tensor) and output.dim() == 4:
                shapes[name] = tuple(output.shape)
                kinds[name] = ("act" if isinstance(module, ACTIVATIONS) else
                               "conv" if isinstance(module, nn.Conv2d) else "other")
        return record

    if isinstance(model, torch.jit.ScriptModule):
        return []
    with model_guard(model), torch.no_grad():  # eval mode; hooks removed even on error
        for name, module in model.named_modules():
            if name:
                handles.append(module.register_forward_hook(hook(name, module)))
        model(inputs[:1])
    for kind in ("act", "conv", "other"):
        chosen = [(n, s) for n, s in shapes.items() if kinds[n] == kind]
        if len(chosen) >= 3 or kind == "other":
            return chosen
    return []


def default_layer(model: nn.Module, inputs: torch.Tensor) -> Optional[str]:
    """The layer :data:`DEFAULT_LAYER_RULE` picks for ``model`` on inputs shaped like
    ``inputs`` (remembered per model and input shape), or None when there is none."""
    key = tuple(inputs.shape[1:])
    with _CACHE_LOCK:
        known = _CACHE.get(model, {})
        if key in known:
            return known[key]
    spatial = [name for name, shape in candidate_layers(model, inputs) if shape[-1] > 1 and shape[-2] > 1]
    chosen = spatial[-1] if spatial else None
    with _CACHE_LOCK:
        _CACHE.setdefault(model, {})[key] = chosen
    return chosen
