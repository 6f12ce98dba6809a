"""Adversarial examples in pixel space: small changes that change the model's answer.

- ``"ascent"``: the lecture's gradient ascent: steps of fixed L2 length along the
  gradient of the target class score (down the true class's score when untargeted)
  until the model predicts what was asked; optionally inside an L∞ ball.
- ``"fgsm"``: one step ``eps * sign(grad)`` of the cross-entropy (Goodfellow et al. 2015).
- ``"pgd"``: projected gradient descent in the L∞ ball (Madry et al. 2018): a random
  start in the ball, then ``steps`` signed steps of ``step_size``, each followed by a
  projection onto the ball and [0, 1].

Every image stops moving as soon as its attack succeeds (so the perturbation is
not grown further than needed and the returned image is one that succeeded).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core import Neuron, autograd_on, model_guard
from ..core.targets import check_target, resolve_target, select_scores
from ..core.validation import check_choice, check_int, check_number, model_device_dtype
from ._common import check_class_output, check_normalize, check_pixels, make_generator, probe
from .engine import Objective, SynthesisResult, optimize
from .parameterization import PixelImage

METHODS = ("ascent", "fgsm", "pgd")


@dataclass
class AdversarialResult(SynthesisResult):
    """``images``: the adversarial pixels ``Tensor[N, C, H, W]`` in [0, 1];
    ``linf``, ``l2``: ``Tensor[N]`` norms of ``images - pixels`` (pixel units);
    ``predictions``: ``Tensor[N]`` classes the model predicts for ``images``;
    ``success``: ``Bool[N]``, prediction == target (targeted) or != target (untargeted);
    ``history``: ``Tensor[steps, N]`` of the loss each step minimised."""

    linf: Tensor = field(default=None)
    l2: Tensor = field(default=None)
    predictions: Tensor = field(default=None)
    success: Tensor = field(default=None)


def adversarial(
    model: nn.Module,
    pixels: Tensor,
    target: Union[int, Sequence[int], Tensor],
    method: str = "pgd",
    *,
    eps: Optional[float] = None,
    steps: Optional[int] = None,
    step_size: Optional[float] = None,
    targeted: bool = False,
    normalize: Optional[nn.Module] = None,
    random_start: bool = True,
    seed: Optional[int] = 0,
    progress: Optional[bool] = None,
    callback=None,
) -> AdversarialResult:
    """Perturb ``pixels`` so that the model predicts ``target`` (targeted) or anything but
    ``target`` (untargeted; ``target`` is then the true label).

    Args:
        model: a classifier (output ``[N, classes]``).
        pixels: ``Tensor[N, C, H, W]`` in [0, 1], not model inputs: the model sees
            ``normalize(pixels)``, and ``eps``/``step_size``/the returned norms are in pixel
            units (``eps = 8/255`` is 8 grey levels).
        target: an int or N ints: the class to reach (``targeted=True``) or the true class
            to leave (``targeted=False``; ``"predicted"`` leaves each image's predicted class).
        method: ``"pgd"`` (default), ``"fgsm"`` or ``"ascent"`` (see the module docstring).
        eps: L∞ radius in pixels; default 8/255 for fgsm/pgd, unbounded (None) for ascent.
        steps: iterations (default pgd 40, ascent 200; fgsm is one step).
        step_size: pgd: signed step (default ``2.5 * eps / steps``); ascent: L2 length of
            each step in pixel units (default ``0.02 * sqrt(C * H * W)``).
        normalize: maps pixels to model inputs (a :class:`~cnnviz_fast.core.Normalize`);
            None: the model takes pixels.
        random_start: pgd starts at a uniformly random point of the ball (seeded).

    Returns:
        :class:`AdversarialResult`. The model runs in eval mode for the call and is left
        as it was; only the images get gradients.
    """
    with model_guard(model), autograd_on():
        check_choice(method, METHODS, "method")
        device, dtype = model_device_dtype(model)
        pixels = check_pixels(pixels, "pixels", device, dtype)
        n = pixels.shape[0]
        check_target(target, n, allow_predicted=not targeted)
        if isinstance(target, Neuron) or (callable(target) and not isinstance(target, Tensor)):
            raise ValueError(f"target must be an int or N ints (classes) for adversarial examples, got {target!r}")
        normalize = check_normalize(normalize, pixels.shape[1])
        eps = check_number(eps, "eps", allow_none=True)
        if eps is None and method != "ascent":
            eps = 8 / 255
        steps = {"fgsm": 1, "pgd": 40, "ascent": 200}[method] if steps is None else steps
        check_int(steps, "steps", minimum=1)
        if method == "fgsm":
            step_size = eps
        elif step_size is None:
            step_size = 2.5 * eps / steps if method == "pgd" else 0.02 * pixels[0].numel() ** 0.5
        step_size = check_number(step_size, "step_size")
        if method == "ascent" and not step_size > 0:
            raise ValueError(f"step_size must be > 0 for method='ascent', got {step_size}")

        clean_output = check_class_output(probe(model, normalize(pixels), "pixels"), n, "adversarial")
        select_scores(clean_output, target)  # checks target's range
        target = resolve_target(target, clean_output)  # "predicted": leave the model's own prediction
        labels = torch.as_tensor(target, device=device).long().expand(n).clone()

        low = (pixels - eps).clamp(0, 1) if eps is not None else 0.0
        high = (pixels + eps).clamp(0, 1) if eps is not None else 1.0
        generator = make_generator(seed)
        start = pixels
        if method == "pgd" and random_start and eps > 0:
            noise = torch.rand(pixels.shape, generator=generator, dtype=dtype).to(device)
            start = pixels + (2 * noise - 1) * eps
        image = PixelImage(start, low=low, high=high)

        def success(output, wanted):
            predicted = output.argmax(1)
            return predicted == wanted if targeted else predicted != wanted

        def loss(features, output, index):
            wanted = labels[index]
            if method == "ascent":  # the lecture: push the class score itself
                score = output.gather(1, wanted[:, None])[:, 0]
                return -score if targeted else score
            cross_entropy = F.cross_entropy(output, wanted, reduction="none")
            return cross_entropy if targeted else -cross_entropy

        objective = Objective(loss=loss, needs_output=True,
                              done=lambda features, output, index: success(output, labels[index]))
        # eps = 0: the ball is a single point, so any step size is projected back onto it
        result = optimize(model, objective, image, normalize=normalize, steps=steps,
                          lr=step_size if step_size > 0 else 1.0, optimizer="sgd",
                          step_norm="l2" if method == "ascent" else "sign", generator=generator,
                          progress=progress, callback=callback, description=f"adversarial ({method})")
        images = result.images
        with torch.no_grad():
            output = model(normalize(images.clone()))
        delta = (images - pixels).flatten(1)
        return AdversarialResult(
            images=images, history=result.history, linf=delta.abs().amax(1), l2=delta.norm(dim=1),
            predictions=output.argmax(1), success=success(output, labels),
        )

