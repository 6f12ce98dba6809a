"""The relevance pass: the model's own forward, with every call LRP treats specially
replaced for its duration (a thread-local ``TorchFunctionMode`` entered and left by
forward hooks on the model, so the target's selection and everything outside the model's
forward keep their plain gradients).

The backward pass of the replaced calls propagates relevance instead of gradients:

- ``F.conv1d/2d/3d`` and ``F.linear`` (modules or functional): the composite's rule
  (:class:`LinearRelevance`); the forward value is the model's own.
- every rectifier spelling that guided backprop intercepts (``_backprop.classify_activation``:
  ReLU, ReLU6, Hardtanh(0, t), clamp(min=0[, max=t]), threshold(0, 0), module / functional
  / Tensor method / in place): relevance passes unchanged (Zennit's ``Pass``). Other
  activations (SiLU, GELU, ELU, LeakyReLU, ...) are refused unless ``nonlinear="pass"``
  (passed unchanged too) or ``"gradient"`` (their plain gradient).
- batch norm, sums of two activations, average pools: see :mod:`.canonizers`.
- calls no rule covers and whose plain gradient would not be relevance (``matmul``,
  ``einsum``, transposed convolutions, layer / group / instance norm) are refused.
Everything else (max pooling, reshapes, concatenation, dropout in eval mode, padding)
keeps its gradient, which routes relevance as Zennit does.
"""
from __future__ import annotations

import threading
import weakref
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from .._backprop import NONLINEAR, classify_activation
from .canonizers import NormPool, NormSum, NormSumInPlace, PassThrough, batch_norm_name
from .composites import Composite
from .layers import LinearCall

NONLINEAR_OPTIONS = ("raise", "pass", "gradient")

_LINEAR = (F.conv1d, F.conv2d, F.conv3d, F.linear)
_ADDS = (torch.add, torch.Tensor.add, torch.Tensor.__add__, torch.Tensor.__radd__)
_ADDS_IN_PLACE = (torch.Tensor.add_, torch.Tensor.__iadd__)
_POOLS = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
          F.adaptive_avg_pool3d)
_MAX_POOLS = (F.max_pool1d, F.max_pool2d, F.max_pool3d, F.adaptive_max_pool1d, F.adaptive_max_pool2d,
              F.adaptive_max_pool3d)
_REFUSED = {
    torch.matmul: "matmul", torch.Tensor.matmul: "matmul", torch.Tensor.__matmul__: "matmul (@)",
    torch.Tensor.__rmatmul__: "matmul (@)", torch.mm: "mm", torch.Tensor.mm: "mm", torch.bmm: "bmm",
    torch.Tensor.bmm: "bmm", torch.addmm: "addmm", torch.einsum: "einsum", F.bilinear: "bilinear",
    F.conv_transpose1d: "conv_transpose1d", F.conv_transpose2d: "conv_transpose2d",
    F.conv_transpose3d: "conv_transpose3d",
}
_NORMS = {F.layer_norm: "layer_norm", F.group_norm: "group_norm", F.instance_norm: "instance_norm"}


def _arg(args, kwargs, index: int, name: str, default=None):
    return args[index] if len(args) > index else kwargs.get(name, default)


def _carries_relevance(t) -> bool:
    return isinstance(t, Tensor) and t.requires_grad and t.is_floating_point()


class LinearRelevance(torch.autograd.Function):
    """The layer's own output forward; its rule's relevance backward."""

    @staticmethod
    def forward(ctx, x: Tensor, layer: LinearCall, compute: Callable[[], Tensor]):
        output = compute()
        layer.kept = layer.rule.keep(output)
        ctx.layer = layer
        ctx.save_for_backward(x)
        return output

    @staticmethod
    def backward(ctx, relevance: Tensor):
        (x,) = ctx.saved_tensors
        layer = ctx.layer
        result = layer.rule.relevance(layer, x, relevance.to(x.dtype), layer.kept)
        return result, None, None


class RelevanceMode(TorchFunctionMode):
    """Replaces the calls of one forward pass (see the module docstring)."""

    def __init__(self, model: nn.Module, composite: Composite, nonlinear: str):
        super().__init__()
        self.model = model
        self.composite = composite
        self.nonlinear = nonlinear
        self.first_done = False
        self.last = None  # (output, its version, LinearCall) of the latest linear layer
        # tensors known to be >= 0 (rectifier outputs, their max / average pools): id -> (ref, version);
        # a layer on one skips the negative-input terms of its rule without looking at its values
        self.nonnegative = {}

    def _mark_nonnegative(self, t) -> None:
        if isinstance(t, Tensor):
            self.nonnegative[id(t)] = (weakref.ref(t), t._version)

    def _is_nonnegative(self, t) -> bool:
        entry = self.nonnegative.get(id(t))
        return entry is not None and entry[0]() is t and entry[1] == t._version

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _LINEAR:
            return self._linear(func, args, kwargs)
        if func is F.batch_norm:
            return self._batch_norm(func, args, kwargs)
        if func in _ADDS or func in _ADDS_IN_PLACE:
            return self._add(func, args, kwargs)
        if func in _POOLS:
            x = args[0]
            if not _carries_relevance(x):
                return func(*args, **kwargs)
            output = NormPool.apply(x, lambda t: func(t, *args[1:], **kwargs), self.composite.stabilizer)
            if self._is_nonnegative(x):
                self._mark_nonnegative(output)
            return output
        if func in _MAX_POOLS:
            output = func(*args, **kwargs)
            if args and self._is_nonnegative(args[0]):
                self._mark_nonnegative(output)
            return output
        if func in _REFUSED or func in _NORMS:
            self._refuse(func, args, kwargs)
            return func(*args, **kwargs)
        activation = classify_activation(func, args, kwargs)
        if activation is None or not _carries_relevance(args[0]):
            return func(*args, **kwargs)
        if activation is NONLINEAR:
            if self.nonlinear == "raise":
                name = getattr(func, "__name__", str(func)).lstrip("_")
                raise ValueError(
                    f"nonlinear: the model applies {name}, which is not a rectifier; LRP's rules assume "
                    "ReLU-like activations (ReLU, ReLU6, Hardtanh(0, t), clamp(min=0)). Pass nonlinear='pass' to "
                    "let relevance pass through it unchanged (Zennit's Pass rule for activations), or "
                    "nonlinear='gradient' to multiply it by the activation's derivative")
            if self.nonlinear == "gradient":
                return func(*args, **kwargs)
        x, rest = args[0], args[1:]
        output = PassThrough.apply(x, lambda t: func(t, *rest, **kwargs))
        if activation is not NONLINEAR:
            self._mark_nonnegative(output)
        return output

    # ------------------------------------------------------------------ calls
    def _linear(self, func, args, kwargs):
        x = _arg(args, kwargs, 0, "input")
        if not _carries_relevance(x):
            return func(*args, **kwargs)
        layer = LinearCall(func, args, kwargs)
        first = not self.first_done and layer.kind in self.composite.first_kinds
        self.first_done = self.first_done or first
        layer.rule = self.composite.rule(layer.kind, first)
        layer.nonnegative_input = self._is_nonnegative(x)
        output = LinearRelevance.apply(x, layer, lambda: func(*args, **kwargs))
        self.last = (output, output._version, layer)
        return output

    def _batch_norm(self, func, args, kwargs):
        x = args[0]
        if not _carries_relevance(x):
            return func(*args, **kwargs)
        running_mean, running_var = _arg(args, kwargs, 1, "running_mean"), _arg(args, kwargs, 2, "running_var")
        weight, bias = _arg(args, kwargs, 3, "weight"), _arg(args, kwargs, 4, "bias")
        training, eps = _arg(args, kwargs, 5, "training", False), _arg(args, kwargs, 7, "eps", 1e-5)
        name = batch_norm_name(self.model, running_mean)
        if training or running_mean is None or running_var is None:
            raise ValueError(f"composite: cannot canonize batch norm {name}: it normalises with batch statistics "
                             "(training mode or no running statistics), so it cannot be merged into the layer "
                             "before it")
        last = self.last
        if last is None or last[0] is not x or x._version != last[1] or last[2].merged:
            raise ValueError(
                f"composite: cannot canonize batch norm {name}: its input is not the unmodified output of a "
                "convolution or linear layer (it normalises the inputs, follows an activation or another "
                "operation), so it cannot be merged into the layer before it; LRP's rules are defined for "
                "linear layers with the batch norm folded in")
        layer = last[2]
        if layer.kind == "linear" and x.dim() != 2:
            raise ValueError(f"composite: cannot canonize batch norm {name}: it normalises dimension 1 of a "
                             f"{x.dim()}-D linear layer output, not the layer's output features")
        output = PassThrough.apply(x, lambda t: func(t, *args[1:], **kwargs))
        layer.merge_batch_norm(running_mean, running_var, weight, bias, eps)
        layer.kept = layer.rule.keep(output)
        self.last = None
        return output

    def _add(self, func, args, kwargs):
        a, b = args[0], _arg(args, kwargs, 1, "other")
        extra = {k: v for k, v in kwargs.items() if k != "other"}
        plain = (extra and extra != {"alpha": 1}) or not (
            _carries_relevance(a) and _carries_relevance(b) and not a.is_leaf and not b.is_leaf
            and a.shape == b.shape and a.dtype == b.dtype)
        if plain:
            return func(*args, **kwargs)
        if func in _ADDS_IN_PLACE:
            return NormSumInPlace.apply(a, b, self.composite.stabilizer)
        return NormSum.apply(a, b, self.composite.stabilizer)

    def _refuse(self, func, args, kwargs) -> None:
        tensors = [a for a in list(args) + list(kwargs.values()) if isinstance(a, Tensor)]
        tensors += [t for a in args if isinstance(a, (list, tuple)) for t in a if isinstance(t, Tensor)]
        if not any(_carries_relevance(t) and not t.is_leaf for t in tensors):
            return  # not on the explained activations (e.g. on parameters only)
        if func in _NORMS:
            raise ValueError(f"composite: cannot canonize {_NORMS[func]}: only batch norms right after a "
                             "convolution or linear layer can be merged into it; LRP has no rule for other "
                             "normalisations")
        raise ValueError(f"model: LRP has no rule for {_REFUSED[func]} on activations (its plain gradient is not "
                         "relevance); rules cover F.conv1d/2d/3d and F.linear (nn.Conv*d, nn.Linear) layers")


@contextmanager
def relevance_rules(model: nn.Module, composite: Composite, nonlinear: str) -> Iterator[RelevanceMode]:
    """Within the block, each forward pass of ``model`` (and only of it) made by this thread
    runs under a fresh :class:`RelevanceMode` (the mode is thread-local; the hooks ignore
    other threads' passes). The hooks are removed on exit (``model_guard`` would remove
    them anyway)."""
    state = {}
    thread = threading.get_ident()

    def enter(module, args):
        if threading.get_ident() == thread:
            state["mode"] = RelevanceMode(model, composite, nonlinear)
            state["mode"].__enter__()

    def leave(module, args, output):
        if threading.get_ident() != thread:
            return
        mode = state.pop("mode", None)
        if mode is not None:
            mode.__exit__(None, None, None)

    handles = [model.register_forward_pre_hook(enter), model.register_forward_hook(leave, always_call=True)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        leave(None, None, None)
