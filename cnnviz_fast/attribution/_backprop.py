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
from torch.overrides import TorchFunctionMode

from ..core import check_images, target_scores
from ..core.grad_mode import autograd_on  # noqa: F401  (re-exported for the methods)
from ..core.validation import check_model_inputs
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
# ReLU interception
# --------------------------------------------------------------------------- #
# The functions a forward pass can reach a ReLU through. ``nn.ReLU`` modules call
# ``F.relu``, which the mode sees first; inside ``__torch_function__`` the mode is
# off, so the replacement is applied exactly once per ReLU.
# Each maps to whether it works in place (F.relu decides by its ``inplace`` argument;
# F.relu_ is torch.relu_).
_RELUS = {F.relu: False, torch.relu: False, torch.Tensor.relu: False, torch.relu_: True, torch.Tensor.relu_: True}


def _guided_relu_backward(grad: Tensor, out: Tensor, mode: str) -> Tensor:
    # the backward kernel of ops.guided_relu (compiled when loaded, else its reference)
    if ops.has_extension():
        return torch.ops.cnnviz._guided_relu_backward(grad, out, mode)
    return ops.reference.guided_relu_backward(grad, out, mode)


class _GuidedReLUInPlace(torch.autograd.Function):
    """In-place ``ops.guided_relu``: ``x.relu_()`` with the modified backward.

    ``x.copy_(guided_relu(x))`` would give the same gradients, but its backward also
    sends zeros to x's old value and sums them in: three extra passes per ReLU.
    """

    @staticmethod
    def forward(ctx, x: Tensor, mode: str) -> Tensor:
        ctx.mode = mode
        ctx.mark_dirty(x)
        x.relu_()
        ctx.save_for_backward(x)  # the output: out > 0 iff input > 0
        return x

    @staticmethod
    def backward(ctx, grad: Tensor):
        (out,) = ctx.saved_tensors
        return _guided_relu_backward(grad, out, ctx.mode), None


class _GuidedReLUMode(TorchFunctionMode):
    def __init__(self, mode: str):
        super().__init__()
        self.mode = mode

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        in_place = _RELUS.get(func)
        if in_place is None or not args[0].is_floating_point():
            return func(*args, **kwargs)  # not a ReLU, or one on integers (no gradient)
        if in_place or kwargs.get("inplace", False):
            # x itself now holds relu(x) (the caller's aliasing holds) and its history
            # runs through the guided backward
            return _GuidedReLUInPlace.apply(args[0], self.mode)
        return ops.guided_relu(args[0], self.mode)


@contextmanager
def intercept_relus(mode: Optional[str]) -> Iterator[None]:
    """Within the block, every ReLU of this thread's forward passes (``nn.ReLU`` and
    ``F.relu`` with or without ``inplace``, ``torch.relu``, ``torch.relu_``,
    ``Tensor.relu``, ``Tensor.relu_``) runs as ``ops.guided_relu(x, mode)``.
    ``mode=None`` does nothing. The model itself is never edited; the mode is
    thread-local, so other threads are not affected."""
    if mode is None:
        yield
        return
    with _GuidedReLUMode(mode):
        yield


# --------------------------------------------------------------------------- #
# gradients
# --------------------------------------------------------------------------- #


def input_gradients(
    model: nn.Module, inputs: Tensor, target, relu_mode: Optional[str] = None, keep_output: bool = False
) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """``(d score / d inputs  Tensor[N, C, H, W], scores Tensor[N], output)`` for one batch.

    Only the input gradient is computed (``torch.autograd.grad``; no parameter
    gradients). ``relu_mode`` ("guided" / "deconvnet") replaces every ReLU's backward.
    ``output`` is the model's output from the same forward pass (detached) with
    ``keep_output``, else None (a Neuron target then stops the pass at its layer).
    """
    x = inputs.detach().requires_grad_(True)
    # the model gets a copy inside the graph: a model that writes into its input
    # (x.mul_ in forward) then works, and x (the caller's memory) is never written
    seen = x.clone()
    output = None
    with intercept_relus(relu_mode):
        if keep_output:
            scores, output = target_scores(model, seen, target, keep_output=True)
            output = detach_output(output)
        else:
            scores = target_scores(model, seen, target)
    if not scores.requires_grad:
        raise ValueError("target does not depend on inputs (its score has no gradient)")
    (grads,) = torch.autograd.grad(scores.sum(), x)
    return grads, scores.detach(), output


def detach_output(output):
    """The model output without its graph (tensors inside tuples / lists / dicts too)."""
    if isinstance(output, Tensor):
        return output.detach()
    if isinstance(output, (tuple, list)):
        return type(output)(detach_output(o) for o in output)
    if isinstance(output, dict):
        return {k: detach_output(v) for k, v in output.items()}
    return output


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
    """``sum_k combine(grad(make_batch(n, k)), k)`` for every image ``n``, ``Tensor[N, C, H, W]``.

    The ``N * copies`` modified images are built and differentiated ``batch_size`` at a
    time (``make_batch(image, copy)`` gets index tensors), so memory stays bounded.
    """
    total = torch.zeros_like(inputs)
    for image, copy in chunk_rows(inputs.shape[0], copies, batch_size, inputs.device):
        grads, _, _ = input_gradients(model, make_batch(image, copy), target_for_rows(target, image), relu_mode)
        total.index_add_(0, image, combine(grads, copy))
    return total
