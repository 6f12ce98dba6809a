"""The one optimisation loop behind every synthesis method.

A method is an :class:`Objective` (a per-image loss on the activations of some
layers or on the model output) plus an image parameterization, penalties, step
operations and random transforms (:mod:`.regularizers`). :func:`optimize` runs:

    native = image.native(); pixels = image.upsample(native)
    x = transforms(pixels)                      # random jitter / scale / rotation
    features = model(normalize(x))              # stops at the deepest needed layer
    loss[n] = objective(features)[n] + sum(penalty(pixels))[n]
    grad = autograd.grad(loss.sum(), image parameters)   # never the model's
    optimiser step; image.project(); step operations (blur, decay, clipping)

Images of a batch are independent (each image's loss only depends on itself), so a
batch optimises N images at once exactly as N separate runs with the same
initialisations and transforms would.
"""
from __future__ import annotations

import contextlib
import functools
import sys
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ..core import autograd_on, capture_layers, forward_to_layers, model_guard
from ._common import identity
from ..core.validation import check_choice, check_int, check_layer_name, check_positive_number
from .parameterization import ImageParameterization

Features = Dict[str, Tensor]

OPTIMIZERS = ("adam", "sgd", "lbfgs")
# dtype= of the synthesis loop: the model's forward pass (and the losses on its features)
# under autocast in that dtype; the images, their gradients and the optimiser stay float32
AUTOCAST_DTYPES = {None: None, "fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
STEP_NORMS = (None, "sign", "l2", "mean_abs")


@dataclass
class Objective:
    """What to minimise.

    Attributes:
        loss: ``loss(features, output, index) -> Tensor[M]``, one value per image of the
            batch that ran: ``index`` (``LongTensor[M]``) says which of the N images they
            are (all of them unless ``done`` took some out); ``features`` maps each name in
            ``layers`` to its activation ``[M, ...]``, ``output`` is the model output
            when ``needs_output`` (else None).
        layers: the layers ``loss`` reads; the forward pass stops at the deepest one
            unless ``needs_output``.
        needs_output: run the whole model and pass its output.
        done: optional ``done(features, output, index) -> Bool[M]``: images that are
            finished (e.g. an attack that succeeded). They stay as they are and leave the
            batch from the next step on (use a momentum-free optimiser: SGD); the loop
            ends when every image is done.
    """

    loss: Callable[[Features, Optional[Tensor], Tensor], Tensor]
    layers: Sequence[str] = ()
    needs_output: bool = False
    done: Optional[Callable[[Features, Optional[Tensor], Tensor], Tensor]] = None


@dataclass
class SynthesisResult:
    """``images``: ``Tensor[N, C, H, W]`` in pixel space [0, 1], on the model's device.
    ``history``: ``Tensor[steps, N]`` (CPU), each image's loss (objective plus
    penalties) before each step (a finished image keeps its last value)."""

    images: Tensor
    history: Tensor = field(repr=False)


def _forward(model: nn.Module, inputs: Tensor, objective: Objective) -> Tuple[Features, Optional[Tensor]]:
    if not objective.needs_output:
        return forward_to_layers(model, inputs, objective.layers), None
    with capture_layers(model, objective.layers) as captured:
        output = model(inputs)
    missing = [name for name in objective.layers if name not in captured]
    if missing:
        raise ValueError(f"layer {missing[0]!r} was not executed during the forward pass of {type(model).__name__}")
    if isinstance(output, Tensor) and not output.requires_grad:
        raise ValueError(f"model output does not depend on its input ({type(model).__name__} returns a tensor "
                         "without a gradient, e.g. detached or computed under torch.no_grad()): nothing to optimise")
    return dict(captured), output


def make_optimizer(name: str, params: List[Tensor], lr: float) -> torch.optim.Optimizer:
    """``adam``, ``sgd`` (plain steps; with a ``step_norm`` they are normalised steps) or
    ``lbfgs`` (one L-BFGS iteration per step, history kept across steps)."""
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    if name == "lbfgs":
        return torch.optim.LBFGS(params, lr=lr, max_iter=1, history_size=50,
                                 tolerance_grad=0.0, tolerance_change=0.0)
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")


def _normalise_steps(grads: Sequence[Tensor], step_norm: Optional[str]) -> List[Tensor]:
    """Per-image gradient normalisation: sign (FGSM/PGD), unit L2 norm, or unit mean |g|
    (DeepDream's normalised steps)."""
    if step_norm is None:
        return list(grads)
    if step_norm == "sign":
        return [g.sign() for g in grads]
    n = grads[0].shape[0]
    if step_norm == "l2":
        norm = sum(g.reshape(n, -1).pow(2).sum(1) for g in grads).sqrt()
    else:
        norm = sum(g.reshape(n, -1).abs().sum(1) for g in grads) / sum(g[0].numel() for g in grads)
    return [g / norm.clamp_min(1e-12).view(-1, *[1] * (g.dim() - 1)) for g in grads]


def _steps(steps: int, progress: Optional[bool], description: str):
    # None: a bar only in interactive use (a terminal, or a Jupyter kernel)
    show = (sys.stderr.isatty() or "ipykernel" in sys.modules) if progress is None else progress
    if not show:
        return range(steps)
    from tqdm.auto import tqdm

    return tqdm(range(steps), desc=description, leave=False)


@contextlib.contextmanager
def _model_channels_last(model: nn.Module, on: bool):
    """The model's 4-D weights channels-last for the block (cuDNN's NHWC kernels with
    channels-last inputs; without it every convolution would convert its weight each
    call), put back as they were afterwards."""
    layout = torch.channels_last
    changed = [p for p in model.parameters() if on and p.dim() == 4 and not p.is_contiguous(memory_format=layout)]
    for p in changed:
        p.data = p.data.contiguous(memory_format=layout)
    try:
        yield
    finally:
        for p in changed:
            p.data = p.data.contiguous()


def _after_step(image, opt, optimizer: str, step_ops, record: dict, step: int, callback) -> bool:
    """Projection and step operations after a step; True when the callback asks to stop."""
    with torch.no_grad():
        if optimizer != "lbfgs":
            image.project()
        if step_ops:
            native, changed = image.native(), False
            for op in step_ops:
                new = op(native, record["native_grad"], step)
                if new is not None:
                    native, changed = new, True
            if changed:
                image.set_native(native)
    return bool(callback is not None and callback(step, record["pixels"], record["losses"]))


def _guarded(function):
    """Run ``function(model, ...)`` inside ``model_guard(model)`` with gradients on."""
    @functools.wraps(function)
    def guarded(model, *args, **kwargs):
        with model_guard(model), autograd_on():
            return function(model, *args, **kwargs)
    return guarded


@_guarded
def optimize(
    model: nn.Module,
    objective: Objective,
    image: ImageParameterization,
    *,
    normalize: Optional[nn.Module] = None,
    steps: int = 256,
    optimizer: str = "adam",
    lr: float = 0.05,
    penalties: Sequence[Callable[[Tensor], Tensor]] = (),
    step_ops: Sequence[Callable] = (),
    transforms: Sequence[Callable] = (),
    step_norm: Optional[str] = None,
    generator: Optional[torch.Generator] = None,
    progress: Optional[bool] = None,
    callback: Optional[Callable[[int, Tensor, Tensor], Optional[bool]]] = None,
    description: str = "synthesis",
    dtype: Optional[str] = None,
    channels_last: bool = False,
) -> SynthesisResult:
    """Minimise ``objective + penalties`` over the images of ``image``.

    Runs inside ``model_guard(model)`` (eval mode, the model left as it was) with gradients
    on, also when the caller is in ``torch.no_grad()`` / ``torch.inference_mode()``.
    Gradients are taken with ``torch.autograd.grad`` w.r.t. the image parameters only:
    the model's parameters never get a ``.grad``.

    Args:
        model: the network; it sees ``normalize(transforms(pixels))``.
        objective: see :class:`Objective`.
        image: the parameterization (its first dimension is the image index).
        normalize: pixel → model-input map (a :class:`~cnnviz_fast.core.Normalize`);
            None means the identity.
        steps: optimiser steps; optimizer, lr: see :func:`make_optimizer`.
        penalties, step_ops, transforms: see :mod:`cnnviz_fast.synthesis.regularizers`.
        step_norm: None, ``"sign"``, ``"l2"`` or ``"mean_abs"``: per-image gradient
            normalisation before each optimiser step.
        generator: the random generator of the transforms.
        progress: tqdm bar; None shows it only in interactive use (stderr a terminal,
            or a Jupyter kernel).
        callback: ``callback(step, pixels, losses)`` after each step (``pixels`` the
            images before the step, ``losses`` ``Tensor[N]``); returning True stops.
        dtype: ``"bf16"`` / ``"fp16"``: the forward pass and the losses under autocast
            (tensor cores on a GPU); None / ``"fp32"``: the model's dtype.
        channels_last: run the model on channels-last (NHWC) images and weights.

    Nothing is read back to the host per step (the loss history stays on the device until
    the end) except what the optimiser reads (L-BFGS's line-search tests) and, with an
    objective's ``done``, whether every image is done.
    """
    check_choice(dtype, AUTOCAST_DTYPES, "dtype")
    if not isinstance(channels_last, bool):
        raise ValueError(f"channels_last must be True or False, got {channels_last!r}")
    check_choice(step_norm, STEP_NORMS, "step_norm")
    check_int(steps, "steps", minimum=0)
    check_positive_number(lr, "lr")
    for name in objective.layers:
        check_layer_name(name, "each layer of objective.layers")
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    normalize = identity if normalize is None else normalize
    params = image.parameters()
    opt = make_optimizer(optimizer, params, lr)
    native_grad_needed = any(getattr(op, "needs_grad", False) for op in step_ops)
    n = image.shape[0]
    done = torch.zeros(n, dtype=torch.bool, device=params[0].device)
    all_images = torch.arange(n, device=done.device)
    last_losses = torch.zeros(n, dtype=torch.float32, device=done.device)
    history: List[Tensor] = []
    record: dict = {}
    amp = (functools.partial(torch.autocast, done.device.type, AUTOCAST_DTYPES[dtype])
           if AUTOCAST_DTYPES[dtype] is not None else contextlib.nullcontext)
    layout = torch.channels_last if channels_last else torch.contiguous_format

    def closure() -> Tensor:
        # finished images leave the batch: only the others are run through the model
        index = all_images if objective.done is None else (~done).nonzero()[:, 0]
        native = image.native()
        pixels = image.upsample(native)
        selected = pixels if len(index) == n else pixels[index]
        x = selected
        for transform in transforms:
            x = transform(x, generator)
        with amp():
            inputs = normalize(x).contiguous(memory_format=layout)
            if any(inputs.untyped_storage().data_ptr() == t.untyped_storage().data_ptr() for t in (pixels, selected)):
                inputs = inputs.clone()  # a model may write into its input; the penalties read the pixels afterwards
            features, output = _forward(model, inputs, objective)
            losses = objective.loss(features, output, index)
        if not isinstance(losses, Tensor) or losses.shape != (len(index),):
            raise ValueError(f"objective.loss must return one loss per image, Tensor[{len(index)}], got "
                             f"{tuple(losses.shape) if isinstance(losses, Tensor) else type(losses).__name__}: "
                             "images are optimised independently")
        for penalty in penalties:
            losses = losses + penalty(selected)
        wrt = params + [native] if native_grad_needed else params
        grads = list(torch.autograd.grad(losses.sum(), wrt))
        if objective.done is not None:
            with torch.no_grad():
                finished = index[objective.done(features, output, index)]
            if len(finished):  # they stay where they are
                done[finished] = True
                for g in grads[:len(params)]:
                    g[finished] = 0
        for p, g in zip(params, _normalise_steps(grads[:len(params)], step_norm)):
            p.grad = g
        if "losses" not in record:  # the first evaluation of this step
            last_losses[index] = losses.detach().to(last_losses.dtype)  # float64 models too
            record.update(losses=last_losses.clone(), pixels=pixels.detach(),
                          native_grad=grads[-1] if native_grad_needed else None)
        return losses.detach().sum()

    with _model_channels_last(model, channels_last):
        for step in _steps(steps, progress, description):
            record.clear()
            if optimizer == "lbfgs":
                opt.step(closure)
            else:
                closure()
                if objective.done is None or not bool(done.all()):
                    opt.step()
            history.append(record["losses"])  # on the device: no read per step
            if objective.done is not None and bool(done.all()):
                break
            if _after_step(image, opt, optimizer, step_ops, record, step, callback):
                break
    for p in params:
        p.grad = None
    with torch.no_grad():
        image.project()
        images = image().detach().clone()
    history_tensor = torch.stack(history).cpu() if history else torch.zeros(0, n)
    return SynthesisResult(images=images, history=history_tensor)
