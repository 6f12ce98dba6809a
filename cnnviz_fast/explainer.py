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
from .core.deferred import deferred_checks
from .core.targets import PREDICTED, check_target, is_predicted
from .core.validation import check_images, model_device_dtype

__all__ = ["Explainer", "Explanation"]

# Methods that run one forward + one backward pass without a host read (core/deferred.py),
# so that a call can be captured in a CUDA graph (cuda_graph=True).
CAPTURABLE = ("saliency", "gradient_x_input", "guided_backprop", "deconvnet", "grad_cam", "guided_grad_cam")

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
        cuda_graph: capture each call in a CUDA graph, once per input shape, dtype and
            target, and replay it (the host launches the whole call at once: what bounds a
            batch-1 call on a GPU). For a model on a CUDA device and the methods in
            :data:`CAPTURABLE`; the target must be ``"predicted"``, an int, a Neuron or a
            callable (the same object each call): one graph each. The inputs must be on the
            model's device; they are copied into the graph's buffer and the results cloned
            out of it. The model's weights must stay the same tensors (in-place updates such
            as ``load_state_dict`` are seen; replaced parameters are not).
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
                 target=PREDICTED, normalize: Optional[Callable[[Tensor], Tensor]] = None,
                 cuda_graph: bool = False, **arguments):
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
        self._graphed = self._graph_setup(cuda_graph)

    def _graph_setup(self, cuda_graph: bool):
        if not isinstance(cuda_graph, bool):
            raise ValueError(f"cuda_graph must be True or False, got {cuda_graph!r}")
        if not cuda_graph:
            return None
        name = self.declared.name if self.declared is not None else getattr(self.method, "__name__", "method")
        if name not in CAPTURABLE or self.declared is None:
            raise ValueError(f"cuda_graph=True captures {', '.join(CAPTURABLE)}; {name} cannot be captured "
                             "(host-side decisions, randomness or reads); use cuda_graph=False")
        device = model_device_dtype(self.model)[0]
        if device.type != "cuda":
            raise ValueError(f"cuda_graph=True needs a model on a CUDA device; its parameters are on {device}")
        _graph_key(self.target)
        from .core.cuda_graph import GraphedCall
        self._device, self._layers = device, {}
        return GraphedCall(name)

    def _graph_call(self, inputs: Tensor, target) -> Explanation:
        key = _graph_key(target)
        with self._lock, deferred_checks():
            check_images(inputs, "inputs")  # finite: checked on the device, read at the end
            if inputs.device != self._device:
                raise ValueError(f"inputs must be on the model's device {self._device} with cuda_graph=True, "
                                 f"got {inputs.device}")
            arguments = self.arguments
            if self._needs_default_layer:  # once per input shape, outside the graph
                shape = (tuple(inputs.shape), inputs.dtype)
                if shape not in self._layers:
                    with torch.no_grad():
                        probe = self.normalize(inputs) if self.normalize is not None else inputs
                    self._layers[shape] = registry.resolve_layer(self.declared, self.model, probe)
                layer, self.layer_note = self._layers[shape]
                arguments = dict(arguments, layer=layer)

            def run(x: Tensor):
                if self.normalize is not None:
                    with torch.no_grad():
                        x = self.normalize(x)
                return self.method(self.model, x, target=target, return_output=True, **arguments)

            maps, output = self._graphed(inputs, (key, arguments.get("layer")), run)
        return Explanation(output, maps)

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
        if self._graphed is not None:
            return self._graph_call(inputs, target)
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


def _graph_key(target):
    """The target as part of a CUDA graph's key: what the graph bakes in must be hashable
    and the same each call (per-image classes would be baked in too)."""
    if is_predicted(target) or isinstance(target, Neuron) or (isinstance(target, int) and not isinstance(target, bool)):
        return target
    if callable(target) and not isinstance(target, Tensor):
        return target
    raise ValueError(f"target must be 'predicted', an int, a Neuron or a callable with cuda_graph=True (each is "
                     f"captured once per input shape), got {type(target).__name__}; use cuda_graph=False for "
                     "per-image classes")
