"""The pass every CAM shares: one forward and (for the gradient CAMs) one backward that
gives the activations of one or more layers and the target's gradients with respect to
them, then the rules of :mod:`.cam_rules`, the upsampling and pytorch-grad-cam's options.

The backward runs only from the target to the layers: the forward pass below the first
captured layer records no autograd graph, that layer's output becomes a fresh leaf, and
``torch.autograd.grad`` differentiates with respect to the captured outputs alone (no
parameter gradients, nothing flows to the input). Every captured output is handed on as a
copy, so an in-place operation after the layer (``ReLU(inplace=True)``) changes neither
the activation that is read nor the tensor the gradient is taken for.

Layer outputs may be feature maps ``[N, K, h, w]``, token sequences ``[N, tokens, C]``
(Vision Transformers: leading class / register tokens skipped, the rest laid on the
input's grid) or channels-last maps ``[N, h, w, C]`` (Swin); see :func:`feature_map`.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._pytree import tree_map

from ..core import Neuron, get_layer, layer_name, target_scores
from ..core.layout import run_in_fast_layout
from ..core.targets import is_predicted, resolve_target, target_for_rows
from ..core.validation import check_choice
from ._backprop import detach_output
from .cam_rules import CAM_RULES, GRADIENT_FREE

INTERPOLATE_MODES = ("bilinear", "nearest")
MAX_PREFIX_TOKENS = 8  # class, distillation and register tokens ahead of the patch tokens

Reshape = Optional[Callable[[Tensor], Tensor]]


# --------------------------------------------------------------------------- layer outputs
def _same_aspect(h: int, w: int, size: Sequence[int]) -> bool:
    return h * size[1] == w * size[0]


def token_grid(tokens: int, size: Sequence[int]) -> Optional[Tuple[int, int, int]]:
    """``(skipped, h, w)``: the fewest leading tokens (at most :data:`MAX_PREFIX_TOKENS`)
    whose removal leaves an ``h x w`` grid with the input's aspect ratio ``size = (H, W)``,
    or None. 197 tokens of a 224 x 224 ViT-B/16 -> ``(1, 14, 14)``."""
    for skipped in range(0, min(MAX_PREFIX_TOKENS, tokens - 1) + 1):
        n = tokens - skipped
        h = max(1, round(math.sqrt(n * size[0] / size[1])))
        # the skipped tokens must be fewer than the grid's: 8 tokens are not 4 + a 2 x 2 grid
        if n % h == 0 and _same_aspect(h, n // h, size) and skipped < n:
            return skipped, h, n // h
    return None


def feature_map(output: Tensor, layer: str, size: Sequence[int], reshape: Reshape = None) -> Tensor:
    """A layer's output as ``Tensor[N, K, h, w]`` (a view where possible).

    - ``[N, K, h, w]``: as it is;
    - ``[N, h, w, C]`` (Swin, ConvNeXt blocks in timm): recognised when its dims 1-2, not
      2-3, have the input's aspect ratio; permuted;
    - ``[N, tokens, C]`` (ViT): leading non-patch tokens skipped (:func:`token_grid`),
      the patch tokens laid out row-major on the grid, as pytorch-grad-cam's
      ``reshape_transform`` does.

    ``reshape`` (a callable ``output -> Tensor[N, K, h, w]``, pytorch-grad-cam's
    ``reshape_transform``) replaces the rule. Anything else is refused naming ``layer``.
    """
    if reshape is not None:
        mapped = reshape(output)
        if not isinstance(mapped, Tensor) or mapped.dim() != 4:
            raise ValueError(f"reshape must map layer {layer!r}'s output {tuple(output.shape)} to a "
                             f"Tensor[N, K, h, w], got "
                             f"{tuple(mapped.shape) if isinstance(mapped, Tensor) else type(mapped).__name__}")
        return mapped
    if output.dim() == 4:
        _, d1, d2, d3 = output.shape
        if not _same_aspect(d2, d3, size) and _same_aspect(d1, d2, size):
            return output.permute(0, 3, 1, 2)
        return output
    if output.dim() == 3:
        grid = token_grid(output.shape[1], size)
        if grid is not None:
            skipped, h, w = grid
            return output[:, skipped:].reshape(output.shape[0], h, w, output.shape[2]).permute(0, 3, 1, 2)
        raise ValueError(f"layer {layer!r} outputs {tuple(output.shape)}: its {output.shape[1]} tokens do not "
                         f"form a grid with the input's aspect ratio {tuple(size)} after at most "
                         f"{MAX_PREFIX_TOKENS} leading tokens; pass reshape= (output -> [N, K, h, w])")
    raise ValueError(f"layer {layer!r} must output a feature map Tensor[N, K, h, w] (or tokens [N, tokens, C], "
                     f"or [N, h, w, C]) to have a spatial map, got {tuple(output.shape)}")


# --------------------------------------------------------------------------- the pass
@contextmanager
def layer_outputs(model: nn.Module, layers: Sequence[str], start_graph: bool = True,
                  check: Optional[Callable[[Tensor, str], None]] = None) -> Iterator[Dict[str, Tensor]]:
    """Record the first output of each named layer (``captured[name]``) during the forward
    pass run inside the block; each is handed on to the rest of the model as a copy.

    With ``start_graph`` run the forward under ``torch.no_grad()``: a captured output that
    does not require grad (the first layer to run, or one on a branch beside it) becomes a
    leaf that does, and gradient recording switches on from there to the end of the pass;
    later layers' outputs stay inside that graph. ``check(output, name)`` validates each
    output as it appears (before the rest of the forward runs). Hooks removed on exit.
    """
    captured: Dict[str, Tensor] = {}

    def make_hook(name: str):
        def hook(_module, _args, output):
            if name in captured:  # a module run several times: its first output counts
                return None
            if not isinstance(output, Tensor):
                raise ValueError(f"layer {name!r} must output a Tensor, got {type(output).__name__}")
            if check is not None:
                check(output, name)
            if start_graph and not output.requires_grad:
                output = output.detach().requires_grad_(True)
                torch.set_grad_enabled(True)  # undone when the enclosing no_grad() block exits
            captured[name] = output
            return output.clone()  # a following in-place op must not touch what is read
        return hook

    handles = [get_layer(model, name).register_forward_hook(make_hook(name)) for name in dict.fromkeys(layers)]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def _missing(model: nn.Module, layer: str, target) -> ValueError:
    if isinstance(target, Neuron):
        return ValueError(f"layer {layer!r} did not run before the forward pass stopped at the target Neuron's "
                          f"layer {target.layer!r}: the Neuron must lie at or after layer")
    return ValueError(f"layer {layer!r} was not executed during the forward pass of {type(model).__name__}")


def layer_pass(model: nn.Module, x: Tensor, layers: Sequence[str], target, gradients: bool,
               keep_output: bool, reshape: Reshape = None):
    """``(activations, gradients, output)``: per layer ``Tensor[N, K, h, w]`` and
    ``d sum(scores) / d activation`` of the same shape (None without ``gradients``), and
    the detached model output of the same pass (None unless ``keep_output``)."""
    size = tuple(x.shape[2:])

    def check(output: Tensor, name: str) -> None:
        feature_map(output, name, size, reshape)

    def forward(batch: Tensor):
        scores = output = None
        with layer_outputs(model, layers, start_graph=gradients, check=check) as captured, torch.no_grad():
            if not gradients:
                output = detach_output(model(batch))
            elif keep_output:
                scores, output = target_scores(model, batch, target, keep_output=True)
                output = detach_output(output)
            else:
                scores = target_scores(model, batch, target)
        return captured, scores, output

    # large CPU batches run channels-last (core.layout); the maps are the same up to rounding
    captured, scores, output = run_in_fast_layout(model, x, forward)
    for layer in layers:
        if layer not in captured:
            raise _missing(model, layer, target)
    raw = [captured[layer] for layer in layers]
    grads: List[Optional[Tensor]] = [None] * len(layers)
    if gradients:
        if not scores.requires_grad:
            raise ValueError(f"target does not depend on layer {layers[0]!r}")
        grads = list(torch.autograd.grad(scores.sum(), raw, allow_unused=True))
        for layer, grad in zip(layers, grads):
            if grad is None:
                raise ValueError(f"target does not depend on layer {layer!r}")
    with torch.no_grad():
        maps = [feature_map(a.detach(), name, size, reshape) for a, name in zip(raw, layers)]
        grads = [None if g is None else feature_map(g, name, size, reshape) for g, name in zip(grads, layers)]
    return maps, grads, (output if keep_output else None)


# --------------------------------------------------------------------------- maps
def upsample(maps: Tensor, size: Sequence[int], interpolate: str) -> Tensor:
    """``Tensor[N, h, w] -> Tensor[N, H, W]`` (bilinear: ``align_corners=False``, as cv2.resize)."""
    align = False if interpolate == "bilinear" else None
    return F.interpolate(maps[:, None], size=tuple(size), mode=interpolate, align_corners=align)[:, 0]


def min_max(maps: Tensor) -> Tensor:
    """Per-map scaling to [0, 1] as pytorch-grad-cam does it: ``(m - min) / (1e-7 + max(m - min))``
    over the last two dims."""
    shifted = maps - maps.amin(dim=(-2, -1), keepdim=True)
    return shifted / (1e-7 + shifted.amax(dim=(-2, -1), keepdim=True))


# --------------------------------------------------------------------------- aug_smooth
# pytorch-grad-cam's default test-time augmentation: horizontal flip x brightness factor
AUGMENTATIONS = tuple((flip, factor) for flip in (False, True) for factor in (0.9, 1.0, 1.1))
_CLEAN = AUGMENTATIONS.index((False, 1.0))


def augment(x: Tensor, target):
    """``(batch, target)`` for the ``6 N`` augmented copies of ``x`` (augmentation-major).
    ``target="predicted"`` becomes each image's prediction on its un-augmented copy, read
    from the same forward pass."""
    n = x.shape[0]
    batch = torch.cat([(x.flip(3) if flip else x) * factor for flip, factor in AUGMENTATIONS])
    if is_predicted(target):
        clean = slice(_CLEAN * n, (_CLEAN + 1) * n)

        def predicted(output: Tensor) -> Tensor:
            classes = resolve_target(target, output[clean]).repeat(len(AUGMENTATIONS))
            return output.gather(1, classes[:, None])[:, 0]
        return batch, predicted
    rows = torch.arange(len(AUGMENTATIONS) * n, device=x.device) % n
    return batch, target_for_rows(target, rows)


def deaugment(maps: Tensor) -> Tensor:
    """Mean over the augmentations of ``Tensor[6 N, H, W]`` maps, each flipped back."""
    per = maps.reshape(len(AUGMENTATIONS), -1, *maps.shape[1:])
    return torch.stack([m.flip(-1) if flip else m for m, (flip, _) in zip(per, AUGMENTATIONS)]).mean(dim=0)


def clean_rows(output, n: int):
    """The un-augmented rows of an output of the augmented batch."""
    rows = slice(_CLEAN * n, (_CLEAN + 1) * n)
    return tree_map(lambda t: t[rows] if isinstance(t, Tensor) and t.dim() and t.shape[0] == 6 * n else t, output)


# --------------------------------------------------------------------------- arguments
def check_interpolate(interpolate: str) -> None:
    check_choice(interpolate, INTERPOLATE_MODES, "interpolate")


def check_flag(value, argument: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{argument} must be True or False, got {value!r}")
    return value


def layer_names_of(model: nn.Module, layer, target, method: str) -> Tuple[List[str], bool]:
    """``(names, fused)``: one layer (a dotted name or a module) or a list / tuple of
    them (their maps fused, pytorch-grad-cam's ``target_layers``)."""
    if isinstance(layer, (list, tuple)):
        if not layer:
            raise ValueError("layer: got an empty list; give one layer or a list of layers")
        names = [layer_name(model, one, "layer", target, method) for one in layer]
        return list(dict.fromkeys(names)), True
    return [layer_name(model, layer, "layer", target, method)], False


def check_methods(methods) -> List[str]:
    if isinstance(methods, str):
        methods = [methods]
    if not isinstance(methods, (list, tuple)) or not methods:
        raise ValueError(f"methods must be a non-empty list of CAM names ({', '.join(CAM_RULES)}), got {methods!r}")
    for name in methods:
        if name not in CAM_RULES:
            raise ValueError(f"methods: unknown CAM {name!r}; choose from {', '.join(CAM_RULES)}")
    return list(dict.fromkeys(methods))


# --------------------------------------------------------------------------- the whole computation
def run_cams(model: nn.Module, x: Tensor, layers: Sequence[str], target, methods: Sequence[str], *,
             fused: bool = False, eigen_smooth: bool = False, aug_smooth: bool = False,
             interpolate: str = "bilinear", keep_output: bool = False, reshape: Reshape = None):
    """``({method: Tensor[N, H, W]}, output or None)`` for checked arguments, inside
    ``model_guard`` / ``autograd_on``.

    Per layer: ``ReLU(rule(A, G))`` upsampled to the input size. A single layer without
    ``aug_smooth`` gives that map as it is. Otherwise the maps are scaled as
    pytorch-grad-cam scales them: each layer's map min-max scaled at its own resolution
    and upsampled, averaged over the layers, scaled again; with ``aug_smooth`` the scaled
    maps of the six augmented copies are flipped back and averaged.
    """
    n, size = x.shape[0], x.shape[2:]
    batch, batch_target = augment(x, target) if aug_smooth else (x, target)
    gradients = any(name not in GRADIENT_FREE for name in methods)
    activations, grads, output = layer_pass(model, batch, layers, batch_target, gradients,
                                            keep_output, reshape)
    normalised = fused or aug_smooth
    results = {}
    with torch.no_grad():
        for name in methods:
            rule = CAM_RULES[name]
            per_layer = [F.relu(rule(a, g, eigen_smooth)) for a, g in zip(activations, grads)]
            if not normalised:
                cam = upsample(per_layer[0], size, interpolate)
            else:
                cam = min_max(torch.stack([upsample(min_max(c), size, interpolate) for c in per_layer]).mean(0))
                if aug_smooth:
                    cam = deaugment(cam)
            results[name] = cam
    if keep_output and aug_smooth:
        output = clean_rows(output, n)
    return results, output
