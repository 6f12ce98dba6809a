"""The rule that picks a layer when a method needs one and the caller gives none."""
from __future__ import annotations

import threading
import weakref
from typing import List, Optional, Tuple

import torch
from torch import nn

from ..attribution.cams import token_grid
from ..core import model_guard

# Rectifiers and other pointwise activations: their outputs are what a CAM usually explains.
ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Hardswish, nn.Mish, nn.Hardtanh,
               nn.Sigmoid, nn.Tanh, nn.PReLU, nn.SELU, nn.CELU)
DEFAULT_LAYER_RULE = ("the last layer with a spatial feature map (h, w > 1, the input's aspect): among activation "
                      "modules when "
                      "the model has at least three, else convolutions, else any 4-D output; in a transformer, "
                      "the last layer norm whose tokens [N, tokens, C] form the input's grid and reach the output")

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
    H, W = inputs.shape[-2:]

    def grid(h: int, w: int) -> bool:  # h x w cells with the input's aspect, up to a stride's rounding
        return h > 1 and w > 1 and abs(h * W - w * H) < H + W

    spatial = [name for name, shape in candidate_layers(model, inputs)  # [N, K, h, w] or [N, h, w, C]
               if grid(shape[-2], shape[-1]) or grid(shape[1], shape[2])]
    chosen = token_layer(model, inputs, spatial[-1] if spatial else None) or (spatial[-1] if spatial else None)
    with _CACHE_LOCK:
        _CACHE.setdefault(model, {})[key] = chosen
    return chosen


def token_layer(model: nn.Module, inputs: torch.Tensor, after: Optional[str]) -> Optional[str]:
    """The last layer norm, run after ``after``, whose output ``[N, tokens, C]`` lays on the
    input's grid (class and register tokens skipped) and whose patch tokens reach the
    output (a gradient probe on the first image: a ViT's final norm feeds only the class
    token to its head, so its patch tokens get no gradient). None for networks without one."""
    if isinstance(model, torch.jit.ScriptModule):
        return None
    size = tuple(inputs.shape[-2:])
    order, tokens, handles = [], {}, []

    def hook(name, module):
        def record(_, args, output):
            if name in order:
                return
            order.append(name)
            if (isinstance(module, nn.LayerNorm) and isinstance(output, torch.Tensor) and output.dim() == 3
                    and output.requires_grad):
                grid = token_grid(output.shape[1], size)
                if grid is not None and grid[1] > 1 and grid[2] > 1:
                    tokens[name] = (output, grid[0])
        return record

    with model_guard(model), torch.enable_grad():
        for name, module in model.named_modules():
            if name:
                handles.append(module.register_forward_hook(hook(name, module)))
        output = model(inputs[:1].detach())
        if not tokens or not isinstance(output, torch.Tensor):
            return None
        names = list(tokens)
        grads = torch.autograd.grad(output.float().sum(), [tokens[n][0] for n in names], allow_unused=True)
    start = order.index(after) if after in order else -1
    reached = [n for n, g in zip(names, grads)
               if g is not None and order.index(n) > start and bool(g[:, tokens[n][1]:].abs().sum() > 0)]
    return reached[-1] if reached else None
