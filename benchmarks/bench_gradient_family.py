"""Gradient family benchmarks: DeepLIFT and GradientSHAP beside Captum and our saliency.

    python benchmarks/bench_gradient_family.py [--quick] [--size 224] [--only deeplift,gradient_shap] [--no-write]

ResNet-18 (1000 classes, random weights), batch 16, one class per image, CPU:
  deeplift vs Captum DeepLift (zero baseline)                  target: >= 1.2x faster
  deeplift vs our saliency (same batch)                        target: <= 1.15x
  gradient_shap vs Captum GradientShap (2 draws per image from 4 baselines)   target: >= 1.2x faster
  gradient_shap vs our saliency on the same 32 rows            target: <= 1.15x
Captum's DeepLift raises on torchvision's ResNet (BasicBlock.relu runs twice): it is timed on
a copy with one nn.ReLU per use (same weights, same function); ours on the original.
Values are checked before timing: DeepLIFT against Captum; GradientSHAP against Captum with
Captum's random draws replaced by ours (tests/test_attribution_gradient_family.py).
"""
from __future__ import annotations

import copy
import types
import warnings
from typing import List

import numpy as np
import torch
from torch import nn

from common import argument_parser, assert_same_up_to_rounding, finish, interleaved, row

from captum.attr import DeepLift, GradientShap
from captum.attr._core.noise_tunnel import NoiseTunnel

import cnnviz_fast as cv
from cnnviz_fast import zoo

warnings.filterwarnings("ignore", module="captum")
warnings.filterwarnings("ignore", message="Setting forward, backward hooks")

BATCH = 16
SAMPLES = 2
SIZE = {"full": 112, "quick": 64}


def problem(size: int):
    model = zoo.resnet18()
    x = zoo.IMAGENET_NORMALIZE(torch.rand(BATCH, 3, size, size, generator=torch.Generator().manual_seed(0)))
    targets = torch.arange(BATCH) * 37 % 1000
    return model, x, targets, f"cpu ResNet-18 {BATCH}x3x{size}x{size}"


def unshared_relus(model: nn.Module) -> nn.Module:
    """A copy whose BasicBlocks use a second nn.ReLU module for their second ReLU."""
    twin = copy.deepcopy(model)

    def forward(block, x):
        identity = x if block.downsample is None else block.downsample(x)
        out = block.bn2(block.conv2(block.relu(block.bn1(block.conv1(x)))))
        return block.relu_out(out + identity)

    for module in twin.modules():
        if type(module).__name__ == "BasicBlock":
            module.relu_out = nn.ReLU(inplace=True)
            module.forward = types.MethodType(forward, module)
    return twin


def bench_deeplift(size: int, rounds: int) -> List[dict]:
    model, x, targets, label = problem(size)
    twin, target_list = unshared_relus(model), targets.tolist()

    def ours():
        return cv.deeplift(model, x, targets)

    def captum():
        return DeepLift(twin).attribute(x, target=target_list)

    def saliency():
        return cv.saliency(model, x, targets, abs=False)

    assert_same_up_to_rounding(ours(), captum().detach(), "deeplift vs Captum")
    t = interleaved({"ours": ours, "captum": captum, "saliency": saliency}, rounds)
    return [row(f"{label} deeplift vs Captum DeepLift", t["ours"], t["captum"], ">= 1.2x", unit="s"),
            row(f"{label} deeplift vs our saliency", t["ours"], t["saliency"], "<= 1.15x", unit="s")]


def bench_gradient_shap(size: int, rounds: int) -> List[dict]:
    model, x, targets, label = problem(size)
    bases = zoo.IMAGENET_NORMALIZE(torch.rand(4, 3, size, size, generator=torch.Generator().manual_seed(1)))
    target_list = targets.tolist()
    rows = torch.arange(BATCH * SAMPLES) // SAMPLES
    x_rows, targets_rows = x[rows], targets[rows]

    def ours():
        return cv.gradient_shap(model, x, targets, baseline=bases, samples=SAMPLES, batch_size=BATCH * SAMPLES,
                                seed=0)

    def captum():
        return GradientShap(model).attribute(x, baselines=bases, target=target_list, n_samples=SAMPLES)

    def saliency():
        return cv.saliency(model, x_rows, targets_rows, abs=False)

    # equality on the same draws: Captum's three random draws replaced by ours (seed 0)
    g = torch.Generator().manual_seed(0)
    picks = torch.randint(len(bases), (BATCH * SAMPLES,), generator=g)
    alphas = torch.rand(BATCH * SAMPLES, generator=g)
    saved = np.random.choice, np.random.uniform, NoiseTunnel._add_noise_to_input
    np.random.choice = lambda k, n: picks.numpy()[:n]
    np.random.uniform = lambda lo, hi, n: alphas.numpy()[:n]
    NoiseTunnel._add_noise_to_input = staticmethod(lambda t, std, n: t.repeat_interleave(n, dim=0))
    try:
        anchor = captum().detach()
    finally:
        np.random.choice, np.random.uniform = saved[:2]
        NoiseTunnel._add_noise_to_input = staticmethod(saved[2])
    assert_same_up_to_rounding(ours(), anchor, "gradient_shap vs Captum (same draws)")
    t = interleaved({"ours": ours, "captum": captum, "saliency": saliency}, rounds)
    return [row(f"{label} gradient_shap ({SAMPLES} draws) vs Captum GradientShap", t["ours"], t["captum"], ">= 1.2x",
                unit="s"),
            row(f"{label} gradient_shap vs our saliency on the same {BATCH * SAMPLES} rows", t["ours"], t["saliency"],
                "<= 1.15x", unit="s")]


SECTIONS = {"deeplift": bench_deeplift, "gradient_shap": bench_gradient_shap}


def main():
    parser = argument_parser(__doc__, SECTIONS)
    parser.add_argument("--size", type=int, default=None, help="image side (default 112; --quick 64)")
    parser.add_argument("--rounds", type=int, default=None, help="timing rounds (default 3; --quick 1)")
    args = parser.parse_args()
    size = args.size or SIZE["quick" if args.quick else "full"]
    rounds = args.rounds or (1 if args.quick else 3)
    rows = [r for name in args.only for r in SECTIONS[name](size, rounds)]
    finish(args, "gradient-family", rows, title="Gradient family benchmarks (DeepLIFT, GradientSHAP)",
           notes=(f"ratio = anchor / ours (speedup) for '>=' targets; ours / anchor for '<=' targets. {rounds} rounds. "
                  f"Batch {BATCH} at {size}x{size} px (the issue asks 224 px; see the load note in the report)."))


if __name__ == "__main__":
    main()
