"""Mechanics shared by every gradient method: input gradients, ReLU interception,
chunked accumulation over noisy / interpolated copies of the inputs.

Public functions wrap their whole body in ``model_guard`` and :func:`autograd_on`;
the helpers here assume both are already active.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._pytree import tree_map
from torch.overrides import TorchFunctionMode

from ..core import check_images, target_scores
from ..core.layout import run_in_fast_layout
from ..core.model_state import is_exported_graph
from ..core.validation import check_choice, check_model_inputs
from ..core.targets import check_target, is_predicted, resolve_target, target_for_rows
from .. import ops

# --------------------------------------------------------------------------- #
# inputs and grad mode
# --------------------------------------------------------------------------- #


def prepare_inputs(inputs, target, copy: bool = False, argument: str = "inputs",
                   model: Optional[nn.Module] = None) -> Tensor:
    """Checked inputs, detached from the caller's graph. Call inside :func:`autograd_on`.

    Without ``copy`` they share the caller's memory, which is safe when the model only sees
    them through :func:`input_gradients` (it hands the model a copy); a method that runs
    the model on them itself asks for a ``copy`` so a model that writes into its input
    cannot change the caller's tensor. With ``model``, inputs it cannot take are refused
    clearly (:func:`~cnnviz_fast.core.validation.check_model_inputs`).
    """
    check_images(inputs, argument)
    if model is not None:
        check_model_inputs(model, inputs, argument)
    check_target(target, inputs.shape[0])
    # an inference tensor (made under inference_mode) cannot enter autograd: copy it too
    return inputs.detach().clone() if copy or inputs.is_inference() else inputs.detach()


# --------------------------------------------------------------------------- #
# rectifier interception
# --------------------------------------------------------------------------- #
# Rectifiers: ReLU, ReLU6, Hardtanh(0, t), clamp(min=0[, max=t]), threshold(0, 0), each
# however it is written (module, functional, torch.*, Tensor method, in place). Every
# forward-pass function the mode sees is looked up in _RECTIFIERS, whose entry reads the
# call's arguments and returns ``(upper, in_place)`` for a rectifying call, None for a
# call that is no activation (clamp(min=1e-6), clamp(-1, 1), tensor bounds: left as they
# are) or _NONLINEAR. ``nn.ReLU6`` / ``nn.Hardtanh`` call ``F.hardtanh``, ``nn.ReLU``
# calls ``F.relu``: the mode sees the outermost function first and inside
# ``__torch_function__`` it is off, so each activation is replaced exactly once.
_NONLINEAR = "nonlinear"
NONLINEAR_OPTIONS = ("raise", "gradient")


def _arg(args, kwargs, index: int, name: str, default=None):
    return args[index] if len(args) > index else kwargs.get(name, default)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _relu(in_place: Optional[bool]):
    # in_place None: decided by the call's ``inplace`` argument (F.relu, F.relu6)
    def parse(args, kwargs):
        return None, bool(_arg(args, kwargs, 1, "inplace", False)) if in_place is None else in_place
    return parse


def _relu6(args, kwargs):
    return 6.0, bool(_arg(args, kwargs, 1, "inplace", False))


def _hardtanh(in_place: Optional[bool]):
    def parse(args, kwargs):
        low, high = _arg(args, kwargs, 1, "min_val", -1.0), _arg(args, kwargs, 2, "max_val", 1.0)
        if not (_is_number(low) and low == 0 and _is_number(high) and high > 0):
            return _NONLINEAR
        inplace = bool(_arg(args, kwargs, 3, "inplace", False)) if in_place is None else in_place
        return float(high), inplace
    return parse


def _clamp(in_place: bool, only_min: bool = False):
    def parse(args, kwargs):
        low = _arg(args, kwargs, 1, "min")
        high = None if only_min else _arg(args, kwargs, 2, "max")
        if not (_is_number(low) and low == 0):
            return None  # no lower bound, another one, or a tensor: not an activation
        if high is not None and not (_is_number(high) and high > 0):
            return None
        return (None if high is None else float(high)), in_place
    return parse


def _threshold(in_place: Optional[bool]):
    def parse(args, kwargs):
        threshold, value = _arg(args, kwargs, 1, "threshold"), _arg(args, kwargs, 2, "value")
        if not (_is_number(threshold) and threshold == 0 and _is_number(value) and value == 0):
            return _NONLINEAR
        return None, bool(_arg(args, kwargs, 3, "inplace", False)) if in_place is None else in_place
    return parse


def _lookup(*paths: str):
    """The functions named (``"F.relu"``, ``"torch._C._nn.elu_"``...) that exist in this torch."""
    roots = {"F": F, "torch": torch, "Tensor": torch.Tensor, "_nn": torch._C._nn}
    found = []
    for path in paths:
        root, name = path.split(".", 1)
        obj = roots[root]
        for part in name.split("."):
            obj = getattr(obj, part, None)
        if obj is not None:
            found.append(obj)
    return found


def _table(entries):
    return {func: parse for paths, parse in entries for func in _lookup(*paths)}


_RECTIFIERS = _table([
    (("F.relu",), _relu(None)),
    (("torch.relu", "Tensor.relu"), _relu(False)),
    (("torch.relu_", "Tensor.relu_", "F.relu_"), _relu(True)),
    (("F.relu6",), _relu6),
    (("F.hardtanh", "_nn.hardtanh"), _hardtanh(None)),
    (("F.hardtanh_", "_nn.hardtanh_"), _hardtanh(True)),
    (("torch.clamp", "Tensor.clamp", "torch.clip", "Tensor.clip"), _clamp(False)),
    (("torch.clamp_", "Tensor.clamp_", "torch.clip_", "Tensor.clip_"), _clamp(True)),
    (("torch.clamp_min", "Tensor.clamp_min"), _clamp(False, only_min=True)),
    (("torch.clamp_min_", "Tensor.clamp_min_"), _clamp(True, only_min=True)),
    (("F.threshold", "torch.threshold"), _threshold(None)),
    (("F.threshold_", "torch.threshold_"), _threshold(True)),
])

# Activations that are not rectifiers (no agreed guided / deconvnet rule): refused unless
# nonlinear="gradient". Sigmoid, Tanh and Hardsigmoid are not listed: they are gates and
# output squashers, not ReLU replacements, with a derivative that is never negative;
# they keep their own gradient (as in Springenberg et al. and Captum).
_NON_RECTIFIERS = set(_lookup(
    "F.leaky_relu", "F.leaky_relu_", "_nn.leaky_relu", "_nn.leaky_relu_",
    "F.rrelu", "F.rrelu_", "torch.rrelu", "torch.rrelu_", "F.prelu", "torch.prelu",
    "F.elu", "F.elu_", "_nn.elu", "_nn.elu_", "F.selu", "F.selu_", "torch.selu", "torch.selu_",
    "F.celu", "F.celu_", "torch.celu", "torch.celu_",
    "F.silu", "_nn.silu", "_nn.silu_", "F.gelu", "_nn.gelu", "_nn.gelu_",
    "F.mish", "_nn.mish", "_nn.mish_", "F.hardswish", "_nn.hardswish", "_nn.hardswish_",
    "F.softplus", "_nn.softplus",
))

_METHOD_NAMES = {"guided": "guided backpropagation", "deconvnet": "deconvnet"}


def check_nonlinear(nonlinear) -> str:
    check_choice(nonlinear, NONLINEAR_OPTIONS, "nonlinear")
    return nonlinear


def _refuse_nonlinear(func, args, kwargs, mode: str) -> None:
    name = getattr(func, "__name__", str(func)).lstrip("_")  # F.threshold is "_threshold"
    if name in ("hardtanh", "hardtanh_", "threshold", "threshold_"):
        name = f"{name} with arguments {tuple(args[1:])} {kwargs or ''}".rstrip()
    raise ValueError(
        f"{_METHOD_NAMES.get(mode, mode)}: the model applies {name}, which is not a rectifier; "
        "guided backprop and deconvnet are defined for ReLU, ReLU6, Hardtanh(0, t) and "
        "clamp(min=0[, max=t]) only. Pass nonlinear='gradient' to let this activation's own "
        "gradient through (the map is then guided only at the rectifiers), or use saliency"
    )




def classify_activation(func, args, kwargs):
    """How the rectifier interception reads one call, for other modes built on its tables
    (LRP's): ``(upper, in_place)`` for a rectifier on a floating tensor (``upper`` None for
    ReLU), :data:`NONLINEAR` for a non-rectifying activation on one, None for any other call."""
    parse = _RECTIFIERS.get(func)
    rule = parse(args, kwargs) if parse is not None else None
    if not (args and isinstance(args[0], Tensor) and args[0].is_floating_point()):
        return None
    if rule == _NONLINEAR or (parse is None and func in _NON_RECTIFIERS):
        return NONLINEAR
    return rule


NONLINEAR = _NONLINEAR


class _GuidedReLUInPlace(torch.autograd.Function):
    """In-place ``ops.guided_relu``: ``x.relu_()`` / ``x.clamp_(0, upper)`` with the
    modified backward.

    ``x.copy_(guided_relu(x))`` would give the same gradients, but its backward also
    sends zeros to x's old value and sums them in: three extra passes per ReLU.
    """

    @staticmethod
    def forward(ctx, x: Tensor, mode: str, upper: Optional[float]) -> Tensor:
        ctx.mode, ctx.upper = mode, upper
        ctx.mark_dirty(x)
        # clamp_ rounds upper to x's dtype, as the kernels do
        x.relu_() if upper is None else x.clamp_(0, upper)
        ctx.save_for_backward(x)  # the output decides the linear range: 0 < out < upper
        return x

    @staticmethod
    def backward(ctx, grad: Tensor):
        (out,) = ctx.saved_tensors
        return ops.guided_relu_backward(grad, out, ctx.mode, ctx.upper), None, None


class _GuidedReLUMode(TorchFunctionMode):
    def __init__(self, mode, nonlinear: str = "raise"):
        super().__init__()
        self.mode = mode
        self.nonlinear = nonlinear
        # a rule object instead of "guided" / "deconvnet" (DeepLIFT's rescale rule): it sees
        # every call first (``intercept``, NotImplemented when it leaves the call alone) and
        # replaces the rectifiers (``rectifier(x, upper, in_place)``)
        self.rule = None if isinstance(mode, str) else mode

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.rule is not None:
            result = self.rule.intercept(func, args, kwargs)
            if result is not NotImplemented:
                return result
        parse = _RECTIFIERS.get(func)
        rule = parse(args, kwargs) if parse is not None else None
        if rule == _NONLINEAR or (parse is None and func in _NON_RECTIFIERS):
            if self.nonlinear == "raise" and args and args[0].is_floating_point():
                _refuse_nonlinear(func, args, kwargs, self.mode)
            return func(*args, **kwargs)
        if rule is None or not args[0].is_floating_point():
            return func(*args, **kwargs)  # not a rectifier, or one on integers (no gradient)
        upper, in_place = rule
        x = args[0]
        if self.rule is not None:
            return self.rule.rectifier(x, upper, in_place)
        if in_place:
            # x itself now holds the result (the caller's aliasing holds) and its history
            # runs through the guided backward
            return _GuidedReLUInPlace.apply(x, self.mode, upper)
        return ops.guided_relu(x, self.mode, upper)


def check_interceptable(model: nn.Module, mode: Optional[str]) -> None:
    """The interception sees Python-level calls only: refuse a TorchScript module (its
    rectifiers run in the TorchScript interpreter) and a torch.export graph (it calls
    ATen's relu directly): their rectifiers would keep their plain gradient.
    torch.compile'd modules are fine (dynamo traces through the mode)."""
    if mode is None:
        return
    if isinstance(model, torch.jit.ScriptModule):
        what = f"a TorchScript module ({type(model).__name__})"
    elif is_exported_graph(model):
        what = "a torch.export graph"
    else:
        return
    raise ValueError(
        f"{_METHOD_NAMES.get(mode, mode)}: model is {what} whose rectifiers cannot be "
        "intercepted (they would keep their plain gradient); pass the eager nn.Module it "
        "was made from"
    )


@contextmanager
def intercept_relus(mode, nonlinear: str = "raise") -> Iterator[None]:
    """Within the block, every rectifier of this thread's forward passes (ReLU, ReLU6,
    Hardtanh(0, t), clamp(min=0[, max=t]), however written: module, functional,
    ``torch.*``, Tensor method, in place) runs as ``ops.guided_relu(x, mode, upper)``.
    Other ReLU-replacing activations (LeakyReLU, ELU, SiLU, GELU, ...) raise a
    ``ValueError`` unless ``nonlinear="gradient"``. ``mode=None`` does nothing. The model
    itself is never edited; the mode is thread-local, so other threads are not affected.
    ``mode`` may also be a rule object (see ``_GuidedReLUMode``; DeepLIFT's rescale rule in
    :mod:`.deep_lift`), which then decides what the rectifiers and any other call do."""
    if mode is None:
        yield
        return
    with _GuidedReLUMode(mode, nonlinear):
        yield


# --------------------------------------------------------------------------- #
# gradients
# --------------------------------------------------------------------------- #


def input_gradients(
    model: nn.Module, inputs: Tensor, target, relu_mode: Optional[str] = None, keep_output: bool = False,
    nonlinear: str = "raise",
) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """``(d score / d inputs  Tensor[N, C, H, W], scores Tensor[N], output)`` for one batch.

    Only the input gradient is computed (``torch.autograd.grad``; no parameter
    gradients). ``relu_mode`` ("guided" / "deconvnet") replaces every rectifier's backward;
    ``nonlinear`` says what other activations do then (see :func:`intercept_relus`).
    ``output`` is the model's output from the same forward pass (detached) with
    ``keep_output``, else None (a Neuron target then stops the pass at its layer).
    """
    check_interceptable(model, relu_mode)
    x = inputs.detach().requires_grad_(True)

    def forward(batch: Tensor):
        # the model gets a copy inside the graph: a model that writes into its input
        # (x.mul_ in forward) then works, and x (the caller's memory) is never written
        with intercept_relus(relu_mode, nonlinear):
            if keep_output:
                scores, output = target_scores(model, batch.clone(), target, keep_output=True)
                return scores, detach_output(output)
            return target_scores(model, batch.clone(), target), None

    scores, output = run_in_fast_layout(model, x, forward)
    if not scores.requires_grad:
        raise ValueError("target does not depend on inputs (its score has no gradient)")
    (grads,) = torch.autograd.grad(scores.sum(), x)
    return grads, scores.detach(), output


def detach_output(output, clone: bool = False):
    """The model output without its graph (tensors inside tuples / lists / dicts too);
    ``clone`` also turns inference-mode tensors into ordinary ones (call it outside
    ``torch.inference_mode``)."""
    def detach(t):
        if not isinstance(t, Tensor):
            return t
        return t.detach().clone() if clone else t.detach()
    return tree_map(detach, output)


def clean_output(model: nn.Module, x: Tensor, target, return_output: bool):
    """For methods that differentiate copies of the inputs (SmoothGrad, IG): one forward
    pass on the clean inputs when its output is wanted or ``target="predicted"`` must be
    fixed to the clean prediction. Returns ``(target, output or None)``."""
    if not (return_output or is_predicted(target)):
        return target, None
    with torch.no_grad():
        output = model(x.clone())  # x shares the caller's memory; the model may write into its input
    return resolve_target(target, output), detach_output(output)


def with_output(result, output, return_output: bool):
    return (result, output) if return_output else result


def chunk_rows(images: int, copies: int, batch_size: int, device) -> Iterator[Tuple[Tensor, Tensor]]:
    """Split the ``images * copies`` rows (image-major: image ``r // copies``, copy
    ``r % copies``) into batches of at most ``batch_size``; yields ``(image, copy)`` indices."""
    total = images * copies
    for start in range(0, total, batch_size):
        rows = torch.arange(start, min(start + batch_size, total), device=device)
        yield rows // copies, rows % copies


def accumulate_gradients(
    model: nn.Module,
    inputs: Tensor,
    target,
    copies: int,
    batch_size: int,
    make_batch: Callable[[Tensor, Tensor], Tensor],
    combine: Callable[[Tensor, Tensor], Tensor],
    relu_mode: Optional[str] = None,
) -> Tensor:
    """``sum_k combine(grad(make_batch(n, k)), k)`` for every image ``n``, ``Tensor[N, C, H, W]``
    (``Tensor[N, ...]`` when ``combine`` returns rows of another shape, e.g. two moments).

    The ``N * copies`` modified images are built and differentiated ``batch_size`` at a
    time (``make_batch(image, copy)`` gets index tensors), so memory stays bounded.
    """
    total = None
    for image, copy in chunk_rows(inputs.shape[0], copies, batch_size, inputs.device):
        grads, _, _ = input_gradients(model, make_batch(image, copy), target_for_rows(target, image), relu_mode)
        part = combine(grads, copy)
        if total is None:
            total = part.new_zeros((inputs.shape[0],) + part.shape[1:])
        total.index_add_(0, image, part)
    return total
