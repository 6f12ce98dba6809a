"""Activation maximisation: the image a class score or a unit likes most,
``argmax_I f(I) - R(I)`` (Simonyan et al. 2014; Yosinski et al. 2015; Olah et al. 2017).

Default prior (Olah et al. 2017): Lucid's Fourier parameterization and random jitter,
scaling and rotation of the image on every step. Explicit penalties (L2, total
variation, α-norm) and Yosinski's step operations are off by default because their
weights are in units of the objective (a class score of ~10 needs other weights than
a channel mean of ~0.1). For small, blurry data such as the zoo digits (8×8 scans
upsampled to 32×32), parameterising at the data's own resolution (``resolution=8``),
``l2=10, tv=5`` and pulling pixels towards the dark background (``center=0``) gives
images an independent classifier reads as the intended digits.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from ..core import Neuron, autograd_on, model_guard
from ..core.targets import check_target
from ..core.validation import check_number, model_device_dtype
from . import regularizers as R
from ._common import check_class_output, check_normalize, check_pixels, make_generator, neutral_pixel, probe
from .engine import Objective, SynthesisResult, optimize
from .parameterization import Size, check_shape, make_image


def _input_shape(input_shape, n: int) -> Tuple[int, int, int, int]:
    shape = tuple(input_shape) if isinstance(input_shape, (tuple, list, torch.Size)) else ()
    if len(shape) != 3:
        raise ValueError(f"input_shape must be (C, H, W), got {input_shape!r}")
    return check_shape((n,) + shape, "input_shape")


@dataclass
class Prior:
    """The natural-image prior of activation maximisation: how the image is
    parameterized, the penalties added to the objective, the operations applied after
    each step and the random transforms applied before each forward pass (0 / None
    switches a piece off). ``visualize_class`` / ``visualize_neuron`` take one as
    ``prior=`` or its fields as keyword arguments."""

    parameterization: str = "fourier"
    resolution: Optional[Size] = None
    l2: float = 0.0
    tv: float = 0.0
    alpha_norm: float = 0.0
    alpha: float = 6.0
    center: object = None
    jitter: Optional[int] = None
    scale: Optional[Tuple[float, float]] = (0.8, 1.2)
    degrees: float = 15.0
    blur_every: int = 0
    blur_sigma: float = 0.5
    decay: float = 0.0
    clip_norm: float = 0.0
    clip_contribution: float = 0.0

    def pieces(self, shape: Tuple[int, int, int, int], center):
        """``(penalties, step_ops, transforms)`` for images of ``shape``, pulling towards ``center``."""
        height, width = shape[2:]
        penalties: List = []
        if self.l2:
            penalties.append(R.L2(check_number(self.l2, "l2"), center))
        if self.tv:
            penalties.append(R.TotalVariation(check_number(self.tv, "tv")))
        if self.alpha_norm:
            penalties.append(R.AlphaNorm(check_number(self.alpha_norm, "alpha_norm"), self.alpha, center))
        step_ops: List = []
        if self.decay:
            step_ops.append(R.Decay(check_number(self.decay, "decay"), center))
        if self.blur_every:
            step_ops.append(R.Blur(self.blur_sigma, self.blur_every))
        if self.clip_norm:
            step_ops.append(R.ClipSmallNorm(self.clip_norm, center))
        if self.clip_contribution:
            step_ops.append(R.ClipSmallContribution(self.clip_contribution, center))
        jitter = max(1, min(height, width) // 10) if self.jitter is None else self.jitter
        transforms: List = [R.Jitter(jitter)] if jitter else []
        if self.scale is not None or self.degrees:
            transforms.append(R.RandomAffine(self.scale or (1.0, 1.0), self.degrees or 0.0))
        return penalties, step_ops, transforms


def _prior(prior: Optional[Prior], options: dict) -> Prior:
    if prior is not None and not isinstance(prior, Prior):
        raise ValueError(f"prior must be a Prior, got {type(prior).__name__}")
    if prior is not None and options:
        raise ValueError(f"give prior= or its fields as keywords, not both (got {sorted(options)})")
    try:
        return prior if prior is not None else Prior(**options)
    except TypeError:
        unknown = sorted(set(options) - set(Prior.__dataclass_fields__))
        raise ValueError(f"unknown option(s) {unknown}; the prior's options are "
                         f"{sorted(Prior.__dataclass_fields__)}") from None


def _ascend(model: nn.Module, loss: Callable, layers: Sequence[str], needs_output: bool,
            shape: Tuple[int, int, int, int], normalize, prior: Prior, *, steps, lr, optimizer, init, seed,
            progress, callback, description) -> SynthesisResult:
    """Build the image and the prior's pieces, then run the engine."""
    device, dtype = model_device_dtype(model)
    center = neutral_pixel(normalize, prior.center)
    penalties, step_ops, transforms = prior.pieces(shape, center)
    generator = make_generator(seed)
    if init is not None:
        init = check_pixels(init, "init", device, dtype)
        if tuple(init.shape) != tuple(shape):
            raise ValueError(f"init must have the shape of the images {tuple(shape)}, got {tuple(init.shape)}")
    image = make_image(prior.parameterization, shape, resolution=prior.resolution, init=init, generator=generator,
                       device=device, dtype=dtype, center=center)
    objective = Objective(loss=loss, layers=tuple(layers), needs_output=needs_output)
    return optimize(model, objective, image, normalize=normalize, steps=steps, lr=lr, optimizer=optimizer,
                    penalties=penalties, step_ops=step_ops, transforms=transforms, generator=generator,
                    progress=progress, callback=callback, description=description)


_DOC_PRIOR = """
    Optimisation (keyword-only):
        steps, lr, optimizer: ``"adam"`` (default) or ``"sgd"``.
        init: starting pixels ``Tensor[N, C, H, W]`` in [0, 1] (default: grey with a
            little seeded noise). With ``init`` and the same ``seed`` (the transforms),
            a batch gives the same images as one call per image.
        seed: initialisation and transforms (same seed, same images); None: random.
        progress: tqdm bar (None: only in interactive use); callback: ``callback(step,
            pixels, losses)``, returning True stops.

    Prior: ``prior=Prior(...)``, or its fields as keyword arguments (0 / None switches
    a piece off):
        parameterization: ``"fourier"`` (Lucid's 1/f-scaled, colour-decorrelated
            spectrum with a sigmoid) or ``"pixels"`` (raw pixels, clamped to [0, 1]).
        resolution: ``(h, w)`` or int: optimise at this resolution and upsample
            bilinearly to ``(H, W)``; default the input size.
        l2: weight of ``mean((I - center)^2)``; tv: weight of the total variation;
            alpha_norm, alpha: weight and exponent of ``mean(|I - center|^alpha)``.
        center: the neutral pixel value (a float or one per channel) the L2/α-norm
            penalties, ``decay`` and clipping pull towards; default ``normalize``'s
            mean (the model's zero input), 0.5 without ``normalize``.
        jitter: random shift in pixels on every step (default ``min(H, W) // 10``);
        scale, degrees: random scaling range and rotation range on every step.
        blur_every, blur_sigma: Gaussian blur of the image every k steps.
        decay: L2 decay rate per step; clip_norm / clip_contribution: percentile of
            pixels with the smallest norm / contribution set to ``center`` every step
            (Yosinski et al. 2015).

    The model runs in eval mode for the call and is left as it was (``model_guard``);
    only the image gets gradients.
"""


def visualize_class(
    model: nn.Module,
    target: Union[int, Sequence[int], Tensor],
    input_shape: Sequence[int],
    *,
    normalize: Optional[nn.Module] = None,
    prior: Optional[Prior] = None,
    steps: int = 200,
    lr: float = 0.05,
    optimizer: str = "adam",
    init: Optional[Tensor] = None,
    seed: Optional[int] = 0,
    progress: Optional[bool] = None,
    callback=None,
    **prior_options,
) -> SynthesisResult:
    """Images that maximise class scores: ``argmax_I score_target(normalize(I)) - R(I)``.

    Args:
        model: a classifier whose output is ``[N, classes]`` pre-softmax scores.
        target: a class (one image) or a sequence of classes (one image per class,
            all optimised in one batch).
        input_shape: ``(C, H, W)`` of one model input.
        normalize: maps pixels in [0, 1] to model inputs (a
            :class:`~cnnviz_fast.core.Normalize`); None means the model takes pixels.
            Nothing is guessed: pass the normalisation the model was trained with.
    {prior}
    Returns:
        :class:`SynthesisResult`: ``images`` ``Tensor[N, C, H, W]`` in [0, 1] on the
        model's device, ``history`` ``Tensor[steps, N]`` of ``-score + R``.
    """
    with model_guard(model), autograd_on():
        if isinstance(target, (Neuron, str)) or callable(target) or target is None:
            raise ValueError(f"target must be a class index or a sequence of them (use visualize_neuron for "
                             f"a Neuron), got {target!r}")
        n = 1 if isinstance(target, int) and not isinstance(target, bool) else len(torch.as_tensor(target).reshape(-1))
        check_target(target, n)
        shape = _input_shape(input_shape, n)
        normalize = check_normalize(normalize, shape[1])
        device, dtype = model_device_dtype(model)
        blank = torch.full((1,) + shape[1:], 0.5, device=device, dtype=dtype)
        classes = check_class_output(probe(model, normalize(blank), "input_shape"), 1, "visualize_class").shape[-1]
        indices = torch.as_tensor(target, device=device).reshape(-1).long()
        if int(indices.min()) < 0 or int(indices.max()) >= classes:
            raise ValueError(f"target classes must lie in [0, {classes}), got {indices.tolist()}")

        def loss(features, output, index):
            return -output.gather(1, indices[index, None])[:, 0]

        return _ascend(model, loss, (), True, shape, normalize, _prior(prior, prior_options),
                       steps=steps, lr=lr, optimizer=optimizer, init=init, seed=seed,
                       progress=progress, callback=callback, description="visualize_class")


def visualize_neuron(
    model: nn.Module,
    neuron: Union[Neuron, Sequence[Neuron]],
    input_shape: Sequence[int],
    *,
    normalize: Optional[nn.Module] = None,
    prior: Optional[Prior] = None,
    steps: int = 200,
    lr: float = 0.05,
    optimizer: str = "adam",
    init: Optional[Tensor] = None,
    seed: Optional[int] = 0,
    progress: Optional[bool] = None,
    callback=None,
    **prior_options,
) -> SynthesisResult:
    """Images that maximise units: ``argmax_I neuron(normalize(I)) - R(I)``.

    Args:
        model: any network.
        neuron: a :class:`~cnnviz_fast.core.Neuron` (one image) or a sequence of them
            (one image each, in one batch); the forward pass stops at the deepest of
            their layers. A Neuron without ``y``/``x`` is its channel's spatial mean.
            Prefer the layer before a ReLU (``conv5`` over ``relu5``): a unit behind a
            ReLU that is 0 on the starting image has no gradient and never moves.
        input_shape: ``(C, H, W)`` of one model input.
        normalize: as in :func:`visualize_class`.
    {prior}
    Returns:
        :class:`SynthesisResult` (``history`` holds ``-activation + R``).
    """
    with model_guard(model), autograd_on():
        neurons = [neuron] if isinstance(neuron, Neuron) else list(neuron) if isinstance(neuron, (list, tuple)) else []
        if not neurons or not all(isinstance(item, Neuron) for item in neurons):
            raise ValueError(f"neuron must be a Neuron or a non-empty sequence of Neurons, got {neuron!r}")
        shape = _input_shape(input_shape, len(neurons))
        normalize = check_normalize(normalize, shape[1])
        layers = tuple(dict.fromkeys(item.layer for item in neurons))
        device, dtype = model_device_dtype(model)
        blank = torch.full((1,) + shape[1:], 0.5, device=device, dtype=dtype)
        features = probe(model, normalize(blank), "input_shape",
                         layers=layers, layer_argument="neuron.layer")
        for item in neurons:
            try:
                item.value(features[item.layer])
            except ValueError as error:
                raise ValueError(f"neuron: {error}") from None

        def loss(features, output, index):
            return -torch.stack([neurons[i].value(features[neurons[i].layer][row:row + 1])[0]
                                 for row, i in enumerate(index.tolist())])

        return _ascend(model, loss, layers, False, shape, normalize, _prior(prior, prior_options),
                       steps=steps, lr=lr, optimizer=optimizer, init=init, seed=seed,
                       progress=progress, callback=callback, description="visualize_neuron")


visualize_class.__doc__ = visualize_class.__doc__.format(prior=_DOC_PRIOR)
visualize_neuron.__doc__ = visualize_neuron.__doc__.format(prior=_DOC_PRIOR)
