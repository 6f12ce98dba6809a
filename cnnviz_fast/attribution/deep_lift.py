"""DeepLIFT with the rescale rule (Shrikumar et al. 2017) and DeepLiftShap, as Captum's
``DeepLift`` / ``DeepLiftShap``.

DeepLIFT is the input gradient with every rectifier's local derivative replaced by a
ratio of differences to a reference run, ``(f(x) - f(r)) / (x - r)``, where ``r`` is the
rectifier's input when the model runs on the baseline (its plain derivative where
``|x - r| < 1e-10``, as Captum). Linear layers (convolutions, batch norm in eval mode,
linear, average pooling, additions) keep their gradient. The attributions are
``(x - baseline) * that gradient``; without max pooling (or with ``max_pool="rescale"``
and windows that do not overlap) they sum to ``f(x) - f(baseline)`` (summation to delta).

2-D max pooling, ``max_pool=``:
  - ``"gradient"`` (default): the plain max-pool gradient, as the DeepLIFT authors'
    reference implementation does by default, and what Captum's ``DeepLift`` computes when
    an ``nn.MaxPool2d`` directly follows an ``nn.ReLU`` module (VGG, ResNet, most CNNs):
    there the ReLU's backward hook receives the pooling's plain gradient, not the one its
    max-pool rule returns (measured in tests/test_attribution_deeplift.py).
  - ``"rescale"``: Captum's max-pool rule (``max(out, ref_out)`` splits the output
    difference between the input's and the reference's arg-max positions, divided by the
    input difference; ``max_unpool2d`` keeps one value where overlapping windows share an
    arg-max), which Captum applies when something else (a convolution, batch norm) sits
    between the ReLU and the pooling. Captum multiplies the reference's share by the
    gradient its ``2N`` pass computed for the baseline rows; here the inputs' gradient is
    used for both shares, the same until a lower max pool meets a pixel where input and
    reference agree exactly.

How it runs: the baselines go through the model once, without gradients, while the
rectifier interception of guided backprop (:func:`._backprop.intercept_relus`, every
ReLU spelling: module, functional, ``torch.*``, Tensor method, in place; ReLU6,
``Hardtanh(0, t)``, ``clamp(min=0[, max=t])``) records each rectifier's (and max pool's)
reference input and output, in call order. Then the inputs run forward and backward once
with the same interception replacing those calls by the rescale rule, reading the
reference of the same call. A baseline shared by all images (a number, ``[C, H, W]``)
costs one forward pass of a single image, so DeepLIFT costs about one saliency pass.
Captum instead runs inputs and baselines as one ``2N`` batch forward and backward, and
hooks ``nn.ReLU`` / ``nn.MaxPool2d`` modules only (a functional ReLU keeps its plain
gradient there, and a module used twice, as torchvision's ResNet ``BasicBlock.relu``,
makes it raise).

The reference of every call is read from the same call of the baseline's pass, so the
model's sequence of rectifier (and pooling) calls must not depend on its input (checked:
a different sequence raises a ``ValueError``).
"""
from __future__ import annotations

from typing import List, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core import autograd_on, model_guard
from ..core.arguments import friendly_arguments
from ..core.layout import run_in_fast_layout
from ..core.targets import target_for_rows
from ..core.validation import check_baseline, check_choice, check_positive_int
from ._backprop import (
    _NON_RECTIFIERS, _NONLINEAR, _RECTIFIERS, _arg, check_nonlinear, chunk_rows, clean_output, input_gradients,
    intercept_relus, prepare_inputs, with_output,
)
from .gradients import DEFAULT_BATCH_SIZE, baseline_batch

__all__ = ["deeplift", "deeplift_shap"]

EPS = 1e-10  # |x - r| below it: the plain derivative (Captum's eps)

MAX_POOL_RULES = ("gradient", "rescale")
_MAX_POOLS = {F.max_pool2d: False, torch.max_pool2d: False, F.max_pool2d_with_indices: True}


# --------------------------------------------------------------------------- autograd rules
class _RescaleRectifier(torch.autograd.Function):
    """``clamp(x, 0, upper)`` (ReLU: ``upper=None``), backward ``grad * multiplier`` with
    ``multiplier = (out - ref_out) / (x - ref_in)``, the plain derivative where
    ``|x - ref_in| < EPS``."""

    @staticmethod
    def forward(ctx, x: Tensor, ref_in: Tensor, ref_out: Tensor, upper: Optional[float], in_place: bool):
        delta = x - ref_in  # before an in-place rectifier overwrites x
        if in_place:
            ctx.mark_dirty(x)
            out = x.relu_() if upper is None else x.clamp_(0, upper)
        else:
            out = x.relu() if upper is None else x.clamp(0, upper)
        multiplier = (out - ref_out).div_(delta)
        tie = delta.abs_() < EPS
        if multiplier.is_cuda or bool(tie.any()):  # exact ties are common (padding, equal pixels): 0/0
            plain = out > 0 if upper is None else (out > 0) & (out < upper)
            multiplier = torch.where(tie, plain.to(multiplier.dtype), multiplier)
        ctx.save_for_backward(multiplier)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        (multiplier,) = ctx.saved_tensors
        return grad * multiplier, None, None, None, None


class _RescaleMaxPool2d(torch.autograd.Function):
    """2-D max pooling whose backward is Captum's DeepLIFT max-pool rule: with ``M =
    max(out, ref_out)``, ``unpool(grad * (M - ref_out), argmax of x) + unpool(grad *
    (out - M), argmax of the reference)``, divided by ``x - ref_in`` (the plain max-pool
    gradient where ``|x - ref_in| < EPS``). ``max_unpool2d`` keeps one value where
    overlapping windows share an arg-max, as in Captum."""

    @staticmethod
    def forward(ctx, x, ref_in, ref_out, ref_index, kernel, stride, padding, dilation, ceil_mode):
        out, index = F.max_pool2d(x, kernel, stride, padding, dilation, ceil_mode=ceil_mode, return_indices=True)
        top = torch.maximum(out, ref_out)
        ctx.params = (kernel, stride, padding, dilation, ceil_mode)
        ctx.save_for_backward(x - ref_in, index, top - ref_out, out - top, ref_index)
        ctx.mark_non_differentiable(index)
        return out, index

    @staticmethod
    def backward(ctx, grad: Tensor, _grad_index):
        delta, index, gain, loss, ref_index = ctx.saved_tensors
        kernel, stride, padding, dilation, ceil_mode = ctx.params
        size = delta.shape
        routed = (F.max_unpool2d(grad * gain, index, kernel, stride, padding, size)
                  + F.max_unpool2d(grad * loss, ref_index.expand_as(index), kernel, stride, padding, size))
        # delta stands in for x: the pooling backward reads only its shape and layout
        plain = torch.ops.aten.max_pool2d_with_indices_backward(
            grad, delta, kernel, stride, padding, dilation, ceil_mode, index)
        result = torch.where(delta.abs() < EPS, plain, routed / delta)
        return result, None, None, None, None, None, None, None, None


# --------------------------------------------------------------------------- the relu-mode rule
class _Rescale:
    """DeepLIFT's rescale rule as a rule object for :func:`._backprop.intercept_relus`.

    ``record()``: the next forward passes (the baselines') store each rectifier's and max
    pool's input and output (and arg-max), in call order. ``explain(rows)``: the next
    forward pass (the inputs') replaces each such call by its rescale rule against the
    stored reference of the same call; ``rows`` picks the reference row of each input row
    (None: the references have one row, or one per input row)."""

    def __init__(self, nonlinear: str = "raise", max_pool: str = "gradient"):
        self.nonlinear = check_nonlinear(nonlinear)
        self.max_pool = check_choice(max_pool, MAX_POOL_RULES, "max_pool")
        self.references: List[tuple] = []
        self.recording = True
        self.position = 0
        self.rows: Optional[Tensor] = None

    def __str__(self) -> str:
        return "DeepLIFT"

    def record(self) -> None:
        self.references, self.recording = [], True

    def explain(self, rows: Optional[Tensor] = None) -> None:
        self.recording, self.position, self.rows = False, 0, rows

    def _reference(self, kind: str, x: Tensor) -> List[Tensor]:
        """The stored tensors of the next call, checked to be the same kind of call on
        the same shape, in x's memory layout and picked for x's rows."""
        if self.position >= len(self.references) or self.references[self.position][0] != kind \
                or self.references[self.position][1] != x.shape[1:]:
            raise ValueError(
                f"deeplift: the model's {self.position + 1}-th rectifier / max-pool call differs between "
                f"the baseline and the inputs (a {kind} on {tuple(x.shape[1:])}); DeepLIFT needs a model whose "
                "sequence of operations does not depend on its input")
        entry = self.references[self.position]
        self.position += 1
        tensors = list(entry[2])
        if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            # the inputs' pass may run channels-last (core.layout): match it once, keep it
            tensors = [t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t for t in tensors]
            self.references[self.position - 1] = entry[:2] + (tuple(tensors),)
        if self.rows is not None:
            tensors = [t.index_select(0, self.rows) for t in tensors]
        return tensors

    # called by the interception -------------------------------------------------------
    def rectifier(self, x: Tensor, upper: Optional[float], in_place: bool) -> Tensor:
        if self.recording:
            reference = x.clone() if in_place else x
            out = (x.relu_() if upper is None else x.clamp_(0, upper)) if in_place else \
                (x.relu() if upper is None else x.clamp(0, upper))
            self.references.append(("rectifier", x.shape[1:], (reference, out)))
            return out
        ref_in, ref_out = self._reference("rectifier", x)
        return _RescaleRectifier.apply(x, ref_in, ref_out, upper, in_place)

    def intercept(self, func, args, kwargs):
        if self.max_pool == "rescale" and func in _MAX_POOLS and args and args[0].is_floating_point() \
                and args[0].dim() == 4:
            return self._max_pool(func, args, kwargs)
        parse = _RECTIFIERS.get(func)
        if func in _NON_RECTIFIERS or (parse is not None and parse(args, kwargs) == _NONLINEAR):
            if self.nonlinear == "raise" and args and args[0].is_floating_point():
                name = getattr(func, "__name__", str(func)).lstrip("_")
                raise ValueError(
                    f"deeplift: the model applies {name}, which is not a rectifier; this DeepLIFT implements the "
                    "rescale rule at ReLU, ReLU6, Hardtanh(0, t), clamp(min=0[, max=t]) and 2-D max pooling. "
                    "Pass nonlinear='gradient' to let this activation's plain gradient through")
            return func(*args, **kwargs)
        return NotImplemented

    def _max_pool(self, func, args, kwargs):
        x = args[0]
        kernel = _arg(args, kwargs, 1, "kernel_size")
        stride = _arg(args, kwargs, 2, "stride", None)
        stride = kernel if stride is None or (isinstance(stride, (list, tuple)) and len(stride) == 0) else stride
        padding, dilation = _arg(args, kwargs, 3, "padding", 0), _arg(args, kwargs, 4, "dilation", 1)
        ceil_mode = bool(_arg(args, kwargs, 5, "ceil_mode", False))
        return_indices = _MAX_POOLS[func] or bool(_arg(args, kwargs, 6, "return_indices", False))
        if self.recording:
            out, index = F.max_pool2d(x, kernel, stride, padding, dilation, ceil_mode=ceil_mode, return_indices=True)
            self.references.append(("max_pool2d", x.shape[1:], (x, out, index)))
        else:
            ref_in, ref_out, ref_index = self._reference("max_pool2d", x)
            out, index = _RescaleMaxPool2d.apply(x, ref_in, ref_out, ref_index, kernel, stride, padding, dilation,
                                                 ceil_mode)
        return (out, index) if return_indices else out


def _record(model: nn.Module, rule: _Rescale, baselines: Tensor) -> None:
    """The baselines' forward pass (no gradients), recording the references."""
    rule.record()
    with torch.no_grad(), intercept_relus(rule):
        run_in_fast_layout(model, baselines, lambda batch: model(batch.clone()))


# --------------------------------------------------------------------------- public
@friendly_arguments
def deeplift(
    model: nn.Module,
    inputs: Tensor,
    target,
    baseline: Union[None, float, Tensor] = None,
    return_output: bool = False,
    nonlinear: str = "raise",
    max_pool: str = "gradient",
):
    """DeepLIFT, rescale rule (Captum's ``DeepLift``): ``(x - baseline) *`` the gradient
    with every rectifier's derivative replaced by ``(f(x) - f(r)) / (x - r)`` against the
    baseline's pass (max pooling: Captum's rule; see the module docstring).

    Args:
        model: the network; run in eval mode for the call, restored afterwards.
        inputs: ``Tensor[N, C, H, W]``.
        target: an int, N ints, a :class:`~cnnviz_fast.Neuron`, a callable
            ``output -> Tensor[N]`` or ``"predicted"``.
        baseline: ``None`` (zeros), a number, or a tensor broadcastable to the inputs
            (``[C, H, W]``, ``[1, C, 1, 1]``, one per image ``[N, C, H, W]``).
        return_output: also return the model's output on the inputs (same pass).
        nonlinear: what a non-rectifying activation (SiLU, GELU, ELU, ...) does:
            ``"raise"`` (default) or ``"gradient"`` (its plain gradient passes).
        max_pool: ``"gradient"`` (default) or ``"rescale"``: the rule at 2-D max
            pooling (see the module docstring; Captum's result is ``"gradient"`` where
            the pooling directly follows an ``nn.ReLU``, ``"rescale"`` elsewhere).

    Returns:
        ``Tensor[N, C, H, W]`` (signed; without max pooling each image's sum is
        ``f(x) - f(baseline)``) on the inputs' device; with ``return_output``,
        ``(attributions, output)``.
    """
    check_nonlinear(nonlinear)
    check_choice(max_pool, MAX_POOL_RULES, "max_pool")
    with model_guard(model), autograd_on():
        x = prepare_inputs(inputs, target, model=model)
        base = check_baseline(0.0 if baseline is None else baseline, x)
        base = base.expand((base.shape[0],) + x.shape[1:])  # one baseline row, or one per image
        rule = _Rescale(nonlinear, max_pool)
        _record(model, rule, base)
        rule.explain()
        grads, _, output = input_gradients(model, x, target, rule, keep_output=return_output, nonlinear="gradient")
    return with_output((x - base) * grads, output, return_output)


@friendly_arguments
def deeplift_shap(
    model: nn.Module,
    inputs: Tensor,
    target,
    baseline: Union[None, float, Tensor] = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    return_output: bool = False,
    nonlinear: str = "raise",
    max_pool: str = "gradient",
):
    """DeepLiftShap (Captum's ``DeepLiftShap``): DeepLIFT of each input against each of
    ``B`` reference images, averaged over the references (SHAP values of the model
    linearised by DeepLIFT).

    Args:
        baseline: the references: a batch ``[B, C, H, W]`` (a distribution, not one per
            input; Captum's ``baselines``), one image ``[C, H, W]`` or a number (then
            this is :func:`deeplift`).
        batch_size: (input, reference) pairs per forward/backward pass, and references
            per reference pass; bounds memory.

    Other arguments and the result as :func:`deeplift`. The references run forward once
    (``batch_size`` at a time, without gradients); the pairs run forward and backward once.
    """
    check_nonlinear(nonlinear)
    check_choice(max_pool, MAX_POOL_RULES, "max_pool")
    check_positive_int(batch_size, "batch_size")
    with model_guard(model), autograd_on():
        x = prepare_inputs(inputs, target, model=model)
        bases = baseline_batch(baseline, x)
        target, output = clean_output(model, x, target, return_output)
        rule = _Rescale(nonlinear, max_pool)
        total = torch.zeros_like(x)
        for start in range(0, len(bases), batch_size):
            group = bases[start:start + batch_size]
            _record(model, rule, group)
            for image, reference in chunk_rows(len(x), len(group), batch_size, x.device):
                rule.explain(None if len(group) == 1 else reference)
                grads, _, _ = input_gradients(model, x[image], target_for_rows(target, image), rule,
                                              nonlinear="gradient")
                total.index_add_(0, image, (x[image] - group[reference]) * grads)
    return with_output(total / len(bases), output, return_output)
