"""The model with batch norm folded into its convolutions, for the perturbation passes.

Perturbation methods run hundreds of masked copies of an image through the model
without gradients. In eval mode a ``BatchNorm2d`` that only normalises one convolution's
output is a per-channel affine map, so it can be folded into that convolution's weights
and bias: the same function, minus one pass over every normalised map (on the 2-core
EPYC, channels-last ResNet-18 passes of 8 / 32 rows ran 1.05-1.10x / 1.11-1.15x faster
folded in two runs; ``benchmarks/bench_perturbation.py --only fold``).

The model itself is never changed: the folded graph is ``torch.fx``'s capture of it
(:func:`.incremental.capture`, thread-confined), which calls the model's own modules,
with each folded pair replaced by a new convolution owned by the graph. Modules with
hooks, subclasses of ``Conv2d`` (which may compute something else) and batch norms using
batch statistics are left alone.

The folded graph is kept per model (weakly) with a fingerprint of what it was built from:
the module tree (names, objects, types, hooks), every parameter and buffer (object, storage,
version counter, dtype) and the settings the folded convolutions copied. A service
explaining request after request skips the capture and the folding (ResNet-18 on the 2-core
EPYC: ~0.5 ms kept vs ~90 ms built; ``bench_perturbation.py --only fold``); a changed model (weights written in place or replaced, modules swapped,
hooks added) gets a new graph.
"""
from __future__ import annotations

import threading
import weakref
from typing import Optional, Tuple

import torch
from torch import Tensor, fx, nn
from torch.nn.modules import module as module_globals

from ...core.targets import Neuron, Target, select_scores, target_for_rows
from .incremental import capture

__all__ = ["folded_model", "checked_folded_model"]


# model -> (fingerprint, folded graph or None), see the module docstring
_FOLDED: "weakref.WeakKeyDictionary[nn.Module, Tuple[tuple, Optional[fx.GraphModule]]]" = weakref.WeakKeyDictionary()
_FOLDED_LOCK = threading.Lock()


def folded_model(model: nn.Module) -> Optional[fx.GraphModule]:
    """``model``'s traced graph with its conv + batch-norm pairs folded (see the module
    docstring), or None when the model cannot be traced, nothing folds, or global module
    hooks are installed (they would see other modules). Cached per model state."""
    if _global_hooks() or not any(isinstance(m, nn.BatchNorm2d) for m in model.modules()):
        return None
    key = _fingerprint(model)
    with _FOLDED_LOCK:
        cached = _FOLDED.get(model)
    if key is not None and cached is not None and _same(cached[0], key):
        return cached[1]
    graph = _build(model)
    if key is not None:
        with _FOLDED_LOCK:
            _FOLDED[model] = (key, graph)
    return graph


def _fingerprint(model: nn.Module) -> Optional[tuple]:
    """What a folded graph of ``model`` depends on (see the module docstring): ``(objects,
    state)``, the modules and tensors themselves (held, so that none is replaced by a new
    object at the same address) and their state, or None when it cannot be told (a tensor
    without a version counter: made under inference mode)."""
    tensors = (*model.parameters(), *model.buffers())
    modules = tuple(model.named_modules())
    try:
        versions = tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in tensors)
    except RuntimeError:
        return None
    settings = tuple((name, type(m), m.training, _has_hooks(m), id(m.__dict__.get("forward")),
                      (m.stride, m.padding, m.dilation, m.groups, m.padding_mode) if isinstance(m, nn.Conv2d) else
                      (m.eps, m.track_running_stats) if isinstance(m, nn.BatchNorm2d) else None)
                     for name, m in modules)
    return (*tensors, *(m for _, m in modules[1:])), (versions, settings)  # not the root: the cache's key


def _same(a: tuple, b: tuple) -> bool:
    return len(a[0]) == len(b[0]) and all(x is y for x, y in zip(a[0], b[0])) and a[1] == b[1]


def _build(model: nn.Module) -> Optional[fx.GraphModule]:
    try:
        graph = capture(model)
    except Exception:  # data-dependent control flow, unsupported Python: not capturable
        return None
    modules = dict(graph.named_modules())
    folded = 0
    for node in list(graph.graph.nodes):
        conv, norm = _foldable_pair(node, modules)
        if conv is None:
            continue
        name = f"_folded_conv_{folded}"
        graph.add_submodule(name, _fold(conv, norm))
        source = node.args[0]
        source.target = name
        node.replace_all_uses_with(source)
        graph.graph.erase_node(node)
        folded += 1
    if not folded:
        return None
    graph.graph.lint()
    graph.recompile()
    return graph


def checked_folded_model(model: nn.Module, inputs: Tensor, target: Target, scores: Tensor) -> nn.Module:
    """The folded graph when it reproduces ``scores`` (the model's target scores of
    ``inputs``, from the clean pass; ``target`` resolved) on the first input, else ``model``. Only float32 and
    float64 models without a Neuron target (whose layer may be one of the folded modules) fold."""
    if isinstance(target, Neuron) or any(p.dtype not in (torch.float32, torch.float64) for p in model.parameters()):
        return model
    folded = folded_model(model)
    if folded is None:
        return model
    try:
        first = target_for_rows(target, torch.zeros(1, dtype=torch.long, device=inputs.device))
        check = select_scores(folded(inputs[:1].clone()), first).to(scores.dtype)
    except Exception:  # the capture missed something the model does
        return model
    if check.shape != (1,) or not torch.allclose(check, scores[:1], rtol=1e-4, atol=1e-5):
        return model
    return folded


def _global_hooks() -> bool:
    return any(getattr(module_globals, name, None) for name in (
        "_global_forward_hooks", "_global_forward_pre_hooks", "_global_forward_hooks_always_called"))


def _has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or getattr(module, "_forward_hooks_with_kwargs", None))


def _foldable_pair(node: fx.Node, modules):
    """``(conv, norm)`` when ``node`` is an eval-mode BatchNorm2d with running statistics
    whose only input is a plain Conv2d read by nothing else; else ``(None, None)``."""
    if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
        return None, None
    norm = modules.get(node.target)
    source = node.args[0]
    if (type(norm) is not nn.BatchNorm2d or norm.training or norm.running_mean is None or _has_hooks(norm)
            or not isinstance(source, fx.Node) or source.op != "call_module" or len(source.users) != 1):
        return None, None
    conv = modules.get(source.target)
    if type(conv) is not nn.Conv2d or _has_hooks(conv) or conv.out_channels != norm.num_features:
        return None, None
    return conv, norm


def _fold(conv: nn.Conv2d, norm: nn.BatchNorm2d) -> nn.Conv2d:
    """A new convolution computing ``norm(conv(x))`` (eval mode), folded in float64."""
    with torch.no_grad():
        scale = norm.running_var.double().add(norm.eps).rsqrt()
        if norm.weight is not None:
            scale = scale * norm.weight.double()
        bias = -norm.running_mean.double() * scale
        if conv.bias is not None:
            bias = bias + conv.bias.double() * scale
        if norm.bias is not None:
            bias = bias + norm.bias.double()
        folded = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                           conv.dilation, conv.groups, True, conv.padding_mode, device=conv.weight.device,
                           dtype=conv.weight.dtype)
        folded.weight.copy_(conv.weight.double() * scale.view(-1, 1, 1, 1))
        folded.bias.copy_(bias)
    return folded.eval().requires_grad_(False)
