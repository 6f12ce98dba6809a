"""Find layers by dotted name and read their activations with forward hooks.

One mechanism serves every method that needs an intermediate activation: a
temporary forward hook that records the layer's output and, when asked, stops
the forward pass as soon as every requested layer has run (so work past the
deepest needed layer is never done).
"""
from __future__ import annotations

import difflib
import sys
from contextlib import contextmanager
from typing import Dict, Iterable, Iterator, List, Sequence

import torch
from torch import nn

from .model_state import is_exported_graph


class _StopForward(Exception):
    """Raised from a hook to end a forward pass early; never escapes this module."""


def layer_names(model: nn.Module) -> List[str]:
    """Dotted names of every submodule, as accepted by ``model.get_submodule``."""
    return [name for name, _ in model.named_modules() if name]


# Wrappers whose forward runs ``self.module``: a layer may be named with or without
# the ``module.`` prefix.
_WRAPPERS = (nn.DataParallel, nn.parallel.DistributedDataParallel)


def check_hookable(model: nn.Module, argument: str = "layer") -> None:
    """A ValueError for the model formats whose submodules' forward hooks do not run
    (reliably): TorchScript (scripted: not supported; traced: silently never run),
    torch.export graphs (submodules only hold parameters) and torch.compile'd modules
    (hooks added after compilation are skipped by default)."""
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")  # loaded once anything was compiled
    if isinstance(model, torch.jit.ScriptModule):
        fix = f"a TorchScript module ({type(model).__name__}); pass the eager nn.Module it was scripted or traced from"
    elif is_exported_graph(model):
        fix = "a torch.export graph; pass the eager nn.Module it was exported from"
    elif eval_frame is not None and isinstance(model, eval_frame.OptimizedModule):
        fix = ("a torch.compile'd module (hooks added after compilation are skipped); "
               "pass its eager module model._orig_mod")
    else:
        return
    raise ValueError(f"{argument}: layer hooks do not run inside {fix}")


def get_layer(model: nn.Module, layer: str, argument: str = "layer") -> nn.Module:
    """``model.get_submodule(layer)`` with a ValueError that names the argument
    and suggests the closest existing names. For ``DataParallel`` /
    ``DistributedDataParallel`` the wrapped module's own names (without ``module.``)
    are accepted too."""
    if not isinstance(layer, str) or not layer:
        raise ValueError(f"{argument} must be a non-empty dotted module name, got {layer!r}")
    check_hookable(model, argument)
    try:
        return model.get_submodule(layer)
    except AttributeError:
        if isinstance(model, _WRAPPERS):
            try:
                return model.module.get_submodule(layer)
            except AttributeError:
                pass
        names = layer_names(model)
        close = difflib.get_close_matches(layer, names, n=5)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ValueError(
            f"{argument} {layer!r} is not a submodule of {type(model).__name__}{hint} "
            f"(all layers: {', '.join(names[:40])}{' ...' if len(names) > 40 else ''})"
        ) from None


_NO_TARGET = object()


def layer_name(model: nn.Module, layer, argument: str = "layer", target=_NO_TARGET, method: str = "") -> str:
    """The dotted name of ``layer`` in ``model``: a name is checked and returned, a module
    object (pytorch-grad-cam's ``model.layer4[-1]``) is looked up by identity. A
    ValueError names ``argument`` otherwise. Given the call's ``target``, a layer that
    looks like a target next to a target that looks like a layer (Captum's order
    ``(target, layer)``) is explained as swapped."""
    if not isinstance(model, nn.Module):
        return layer  # not a module (an ExportedProgram, ...): the method's model check says what to pass
    looks_like_layer = isinstance(target, nn.Module) or (isinstance(target, str) and target != "predicted")
    if target is not _NO_TARGET and looks_like_layer and not isinstance(layer, (str, nn.Module)):
        raise ValueError(f"{argument}: got {layer!r} as layer and {target!r} as target; {method or 'this method'} "
                         f"takes (model, inputs, layer, target): swap them (Captum puts target first)")
    if isinstance(layer, nn.Module):
        for name, module in model.named_modules():
            if module is layer and name:
                return name
        raise ValueError(f"{argument}: the {type(layer).__name__} module given is not a submodule of "
                         f"{type(model).__name__} (pass a module of this model or its dotted name)")
    if isinstance(layer, (list, tuple)) and len(layer) == 1 and isinstance(layer[0], (str, nn.Module)):
        raise ValueError(f"{argument} must be one layer (a dotted name or a module), got a list of one; "
                         f"pass {argument}=<the layer> itself")
    if not isinstance(layer, str):
        shown = type(layer).__name__ if isinstance(layer, (torch.Tensor, list, tuple, dict)) else repr(layer)
        raise ValueError(f"{argument} must be a dotted module name or a submodule of the model, got {shown}")
    get_layer(model, layer, argument)
    return layer


def _first_tensor(output):
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"layer output must be a tensor (or a tuple starting with one), got {type(output).__name__}")


@contextmanager
def capture_layers(
    model: nn.Module, layers: Sequence[str], stop: bool = False, argument: str = "layer"
) -> Iterator[Dict[str, torch.Tensor]]:
    """Record the output of each named layer during forward passes run inside the block.

    Yields a dict ``{name: Tensor}`` filled by the hooks (the first call of a layer
    per forward pass wins when a module runs several times). With ``stop=True`` the
    forward pass raises an internal exception once all layers have run; use
    :func:`forward_to_layers` for that, which catches it. Hooks are removed on exit,
    also when the block raises.
    """
    modules = {name: get_layer(model, name, argument) for name in dict.fromkeys(layers)}
    captured: Dict[str, torch.Tensor] = {}
    handles = []

    def make_hook(name):
        def hook(module, args, output):
            if name not in captured:
                captured[name] = _first_tensor(output)
                if stop and len(captured) == len(modules):
                    raise _StopForward
        return hook

    try:
        for name, module in modules.items():
            handles.append(module.register_forward_hook(make_hook(name)))
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def forward_to_layers(
    model: nn.Module, inputs: torch.Tensor, layers: Iterable[str], stop: bool = True,
    argument: str = "layer",
) -> Dict[str, torch.Tensor]:
    """Run ``model(inputs)`` and return the activations of ``layers``.

    With ``stop=True`` (default) the pass ends at the deepest requested layer.
    Raises ValueError naming ``argument`` if a layer never ran.
    """
    layers = list(dict.fromkeys(layers))
    with capture_layers(model, layers, stop=stop, argument=argument) as captured:
        try:
            model(inputs)
        except _StopForward:
            pass
    missing = [name for name in layers if name not in captured]
    if missing:
        raise ValueError(f"{argument} {missing[0]!r} was not executed during the forward pass of "
                         f"{type(model).__name__}")
    return {name: captured[name] for name in layers}
