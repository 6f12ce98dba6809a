"""One object a service builds once and calls per request: ``explainer(x) -> (output, maps)``.

    explainer = Explainer(model, "grad_cam", layer="layer4", normalize=IMAGENET_NORMALIZE)
    output, maps = explainer(pixels)      # one forward + one backward per call

The prediction comes from the same forward pass as the explanation (``target="predicted"``
and ``return_output=True`` of the attribution methods).
"""
from __future__ import annotations

import inspect
import threading
import weakref
from typing import Callable, NamedTuple, Optional, Union

import torch
from torch import Tensor, nn

from . import registry
from .core import Neuron, get_layer
from .core.targets import PREDICTED, check_target, is_predicted

__all__ = ["Explainer", "Explanation"]

# One lock per model instance, shared by every Explainer of that model (see Explainer).
_LOCKS: "weakref.WeakKeyDictionary[nn.Module, threading.Lock]" = weakref.WeakKeyDictionary()
_LOCKS_LOCK = threading.Lock()


def _model_lock(model: nn.Module) -> threading.Lock:
    with _LOCKS_LOCK:
        lock = _LOCKS.get(model)
        if lock is None:
            lock = _LOCKS[model] = threading.Lock()
        return lock


class Explanation(NamedTuple):
    """``output``: the model's output on the inputs (detached; ``[N, classes]`` for a
    classifier); ``maps``: the method's attributions for the same inputs."""

    output: Tensor
    maps: Tensor


class Explainer:
    """A model, an attribution method and its arguments, set up once; call it per request.

    Args:
        model: the network (any ``nn.Module`` the method accepts).
        method: the name of a declared attribution method
            (``cnnviz_fast.registry.attribution_methods()``: ``"saliency"``, ``"grad_cam"``,
            ``"occlusion"``, ...) or a function with the same calling convention
            ``method(model, inputs, ..., target=..., return_output=True) -> (maps, output)``.
            A declared method that needs a layer and gets none uses the registry's default
            layer for the first request's input shape (``explainer.layer_note`` says which).
        target: what to explain (default ``"predicted"``: each input's top class, from the
            same forward pass); overridable per call.
        normalize: optional map from pixels to model inputs (e.g.
            :class:`~cnnviz_fast.core.Normalize`), applied to each request's inputs. The maps
            are those of the method on the model inputs ``normalize(x)`` (what the model
            sees); the caller's ``x`` is not modified.
        **arguments: the method's other arguments (``layer``, ``samples``, ``window``, ...).

    At construction the method's arguments are bound to its signature and every layer
    they name (``layer``, a Neuron target's layer) is looked up in the model, so a
    mistake is a ValueError before the first request. Nothing is stored on the model:
    each call runs the method, which puts the model in eval mode for the call and leaves
    it as it was (hooks, train/eval flags, ``requires_grad``).

    Threads: calls may come from any number of threads. Calls on the same model instance
    (from this or any other Explainer) run one at a time, because the methods switch the
    model to eval mode and add temporary hooks for the duration of a call; calls on
    different model instances run in parallel. For parallel explanations of one network,
    give each thread its own copy (``copy.deepcopy(model)``).
    """

    def __init__(self, model: nn.Module, method: Union[str, Callable] = "saliency", *,
                 target=PREDICTED, normalize: Optional[Callable[[Tensor], Tensor]] = None, **arguments):
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        declared = None
        if isinstance(method, str):
            if method not in registry.attribution_methods():
                raise ValueError(f"method must be one of {', '.join(registry.attribution_methods())} or a "
                                 f"function, got {method!r}")
            declared = registry.get_method(method)
            function = declared.function
        elif callable(method):
            function = method
        else:
            raise ValueError(f"method must be a method name or a function, got {type(method).__name__}")
        if normalize is not None and not callable(normalize):
            raise ValueError(f"normalize must be a callable (pixels -> model inputs) or None, "
                             f"got {type(normalize).__name__}")
        for name in ("return_output", "return_deltas", "inputs", "model"):
            if name in arguments:
                raise ValueError(f"{name} is set by the Explainer; do not pass it")
        if "layer" in arguments:
            arguments["layer"] = registry.resolve_layer(declared, model, None, arguments["layer"])[0] \
                if declared is not None else arguments["layer"]
        self._needs_default_layer = declared is not None and declared.needs_layer and "layer" not in arguments
        self.layer_note: Optional[str] = None
        bound = dict(arguments, layer=None) if self._needs_default_layer else arguments
        try:
            inspect.signature(function).bind(model, None, target=target, return_output=True, **bound)
        except TypeError as error:
            raise ValueError(f"arguments do not fit {getattr(function, '__name__', method)}: {error}") from None
        self._check_target(model, target)
        self.model, self.method, self.target, self.normalize = model, function, target, normalize
        self.declared = declared
        self.arguments = arguments
        self._lock = _model_lock(model)

    @staticmethod
    def _check_target(model: nn.Module, target) -> None:
        if is_predicted(target):
            return
        if isinstance(target, Neuron):
            get_layer(model, target.layer, "target.layer")
        elif isinstance(target, str):
            raise ValueError(f"target must be an int, N ints, a Neuron, a callable or {PREDICTED!r}, got {target!r}")
        elif target is None:
            check_target(target, 1)

    def __call__(self, inputs: Tensor, target=None) -> Explanation:
        """Explain ``inputs`` (``Tensor[N, C, H, W]``, pixels when ``normalize`` is given):
        ``Explanation(output, maps)``. ``target`` overrides the Explainer's for this call."""
        if target is None:
            target = self.target
        else:
            self._check_target(self.model, target)
        if self.normalize is not None:
            if not isinstance(inputs, Tensor):
                raise ValueError(f"inputs must be a Tensor[N, C, H, W], got {type(inputs).__name__}")
            with torch.no_grad():
                inputs = self.normalize(inputs)
        with self._lock:
            arguments = self.arguments
            if self._needs_default_layer:
                layer, self.layer_note = registry.resolve_layer(self.declared, self.model, inputs)
                arguments = dict(arguments, layer=layer)
            maps, output = self.method(self.model, inputs, target=target, return_output=True, **arguments)
        return Explanation(output, maps)

    def __repr__(self) -> str:
        arguments = "".join(f", {k}={v!r}" for k, v in self.arguments.items())
        return (f"Explainer({type(self.model).__name__}, {getattr(self.method, '__name__', self.method)}, "
                f"target={self.target!r}{arguments})")
