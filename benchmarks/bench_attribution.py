"""Attribution benchmarks: ours timed beside the reference implementation in the same run.

    python benchmarks/bench_attribution.py [--quick] [--device cpu|cuda] [--only saliency,guided,...] [--no-write]

One function per method section (``bench_<section>(quick, device) -> rows``), listed in
SECTIONS; ``main`` runs them on ``--device`` (cpu or cuda), and writes
benchmarks/results/attribution-<machine>.{md,json}. Each section checks that the
outputs agree before timing; contenders are timed by ``common.interleaved``.
Occlusion has its own script, bench_occlusion.py.

CPU (ResNet-18, 1000 classes, random weights, batch 16 of 112x112, one class per image):
  saliency        vs one bare forward + torch.autograd.grad            target: <= 1.05x the anchor
  guided_backprop vs Captum GuidedBackprop                             target: >= 1.3x faster
  guided_backprop vs our saliency                                      target: <= 1.10x
  grad_cam        vs pytorch-grad-cam GradCAM, layer4                  target: >= 2x faster
  smoothgrad / integrated_gradients vs Captum NoiseTunnel / IntegratedGradients (info:
  2 images x 8 samples/steps, 16 images per pass on both sides)
CUDA (--device cuda): the same at 224x224.
"""
from __future__ import annotations

import copy
import warnings
from typing import List

import numpy as np
import torch

from common import argument_parser, assert_same_up_to_rounding, finish, interleaved, machine_description, row

from captum.attr import GuidedBackprop, IntegratedGradients, NoiseTunnel, Saliency
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

import cnnviz_fast as cv
from cnnviz_fast import zoo
from cnnviz_fast.core import check_images

warnings.filterwarnings("ignore", module="captum")  # "Setting backward hooks on ReLU activations" etc.

BATCH = 16


def problem(device: str, size: int = None):
    """ResNet-18 and a batch of 16 images with one target class each."""
    size = size or (112 if device == "cpu" else 224)
    model = zoo.resnet18().to(device)
    x = torch.rand(BATCH, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    x = zoo.IMAGENET_NORMALIZE(x)
    targets = torch.arange(BATCH, device=device) * 37 % 1000
    return model, x, targets, f"{device} ResNet-18 {BATCH}x3x{size}x{size}"


def rounds_for(quick: bool) -> int:
    return 1 if quick else 7


# --------------------------------------------------------------------------- sections
def bare_on(model, x, targets):
    """|d score / d x| with one forward and one ``torch.autograd.grad``, nothing else."""
    leaf = x.detach().requires_grad_(True)
    scores = model(leaf).gather(1, targets[:, None]).sum()
    return torch.autograd.grad(scores, leaf)[0].abs()


def bench_saliency(quick: bool, device: str) -> List[dict]:
    model, x, targets, label = problem(device)

    def ours():
        return cv.saliency(model, x, targets)

    def bare():  # the floor: one forward and one autograd.grad, nothing else
        return bare_on(model, x, targets)

    def finite_check():
        return check_images(x)

    assert_same_up_to_rounding(ours(), bare(), "saliency vs bare")
    t = interleaved({"ours": ours, "bare": bare, "check": finite_check}, rounds_for(quick))
    rows = [
        row(f"{label} saliency vs bare autograd.grad", t["ours"], t["bare"], "<= 1.05x"),
        row(f"{label} input check (check_images) share of saliency", t["check"], t["ours"], "<= 0.01x"),
    ]
    # the fixed cost per call (guard, checks, target selection), measured where it shows:
    # one tiny image, many rounds; reported as a share of the full problem's saliency time
    tiny, tiny_targets = x[:1, :, :32, :32].contiguous(), targets[:1]
    tiny_t = interleaved({"ours": lambda: cv.saliency(model, tiny, tiny_targets),
                          "bare": lambda: bare_on(model, tiny, tiny_targets)}, 5 if quick else 20, number=5)
    overhead = max(tiny_t["ours"] - tiny_t["bare"], 0.0)
    rows.append(row(f"{label} saliency fixed overhead (1x3x32x32 difference) share", overhead, t["ours"],
                    "<= 0.01x"))
    return rows


def bench_guided_backprop(quick: bool, device: str) -> List[dict]:
    model, x, targets, label = problem(device)
    target_list = targets.tolist()

    def ours():
        return cv.guided_backprop(model, x, targets)

    def captum():
        return GuidedBackprop(model).attribute(x, target=target_list)

    def our_saliency():
        return cv.saliency(model, x, targets, abs=False)

    assert_same_up_to_rounding(ours(), captum(), "guided_backprop vs Captum")
    t = interleaved({"ours": ours, "captum": captum, "saliency": our_saliency}, rounds_for(quick))
    return [
        row(f"{label} guided_backprop vs Captum GuidedBackprop", t["ours"], t["captum"], ">= 1.3x"),
        row(f"{label} guided_backprop vs our saliency", t["ours"], t["saliency"], "<= 1.10x"),
    ]


def _normalised(cam: torch.Tensor) -> np.ndarray:
    """pytorch-grad-cam's per-image min-max scaling, for the equality check."""
    cam = cam.cpu().numpy()
    cam = cam - cam.min(axis=(1, 2), keepdims=True)
    return cam / (1e-7 + cam.max(axis=(1, 2), keepdims=True))


def bench_grad_cam(quick: bool, device: str) -> List[dict]:
    model, x, targets, label = problem(device)
    layer = "layer4"
    their_targets = [ClassifierOutputTarget(int(c)) for c in targets]
    cam = GradCAM(model=model, target_layers=[model.get_submodule(layer)])

    def ours():
        return cv.grad_cam(model, x, layer, targets)

    def theirs():  # backward through the whole network, parameter gradients included
        return cam(input_tensor=x, targets=their_targets)

    try:
        np.testing.assert_allclose(_normalised(ours()), theirs(), atol=1e-4)
        t = interleaved({"ours": ours, "theirs": theirs}, rounds_for(quick))
    finally:
        cam.activations_and_grads.release()
        model.zero_grad(set_to_none=True)
    return [row(f"{label} grad_cam(layer4) vs pytorch-grad-cam GradCAM", t["ours"], t["theirs"], ">= 2x")]


def bench_smoothgrad_ig(quick: bool, device: str) -> List[dict]:
    """Info rows: 2 images x 8 noisy copies / path points, 16 images per pass on both sides."""
    model, x, targets, label = problem(device)
    x, targets, copies = x[:2], targets[:2], 8
    target_list = targets.tolist()

    # equality first, with the same noise (one image, Captum drawing one copy per partition), on
    # the CPU: CUDA's generator gives a batch of noise other values than the same count drawn in
    # pieces, so only the CPU reproduces Captum's draws
    sigma = 0.15 * float(x[0].max() - x[0].min())
    cpu_model, first = copy.deepcopy(model).cpu(), x[:1].cpu()
    torch.manual_seed(0)
    ref = NoiseTunnel(Saliency(cpu_model)).attribute(first, nt_samples=2, nt_samples_batch_size=1, stdevs=sigma,
                                                     target=target_list[:1])
    torch.manual_seed(0)
    ours = cv.smoothgrad(cpu_model, first, target_list[:1], samples=2, noise=0.15, batch_size=1)  # Captum's batching
    torch.testing.assert_close(ours, ref)
    assert_same_up_to_rounding(
        cv.integrated_gradients(model, x, targets, steps=copies, batch_size=16),
        IntegratedGradients(model).attribute(x, target=target_list, n_steps=copies, internal_batch_size=16),
        "integrated_gradients vs Captum")

    contenders = {
        "smoothgrad": lambda: cv.smoothgrad(model, x, targets, samples=copies, batch_size=16),
        "noise_tunnel": lambda: NoiseTunnel(Saliency(model)).attribute(
            x, nt_samples=copies, nt_samples_batch_size=copies, stdevs=sigma, target=target_list),
        "ig": lambda: cv.integrated_gradients(model, x, targets, steps=copies, batch_size=16),
        "captum_ig": lambda: IntegratedGradients(model).attribute(
            x, target=target_list, n_steps=copies, internal_batch_size=16),
    }
    t = interleaved(contenders, rounds_for(quick))
    small = label.replace(f"{BATCH}x", "2x")
    return [
        row(f"{small} smoothgrad(8) vs Captum NoiseTunnel(Saliency)", t["smoothgrad"], t["noise_tunnel"], ""),
        row(f"{small} integrated_gradients(8) vs Captum IG", t["ig"], t["captum_ig"], ""),
    ]


SECTIONS = {
    "saliency": bench_saliency,
    "guided": bench_guided_backprop,
    "gradcam": bench_grad_cam,
    "smoothgrad_ig": bench_smoothgrad_ig,
}


def main():
    args = argument_parser(__doc__, SECTIONS).parse_args()
    print(machine_description(), flush=True)
    rows = [r for name in args.only for r in SECTIONS[name](args.quick, args.device)]
    finish(args, "attribution", rows, title="Attribution benchmarks (gradient methods)",
           notes=("ratio = anchor / ours (speedup) for '>=' targets and the info rows; ours / anchor (or the "
                  f"stated share) for '<=' targets. {rounds_for(args.quick)} rounds. The machine may have "
                  "been shared with other jobs while this ran (noisy)."))


if __name__ == "__main__":
    main()
