"""LRP benchmark: our lrp (EpsilonPlusFlat) timed beside our plain saliency and Zennit's
Gradient attributor with the same composite, in the same run.

    python benchmarks/bench_lrp.py [--quick] [--device cpu|cuda] [--only vgg16,resnet18] [--size N] [--rounds R]
                                   [--no-write]

VGG-16 4x3x224x224 (Zennit's VGGCanonizer) and ResNet-18 16x3x224x224 (ResNetCanonizer),
torchvision architectures with random weights (ResNet-18's batch norms with random
statistics), one target class per image. Each section checks that ours and Zennit agree
(norm-wise, per batch) before timing.
  lrp vs our saliency                   target: <= 1.5x
  lrp vs Zennit EpsilonPlusFlat         target: >= 2x faster
  (info) Zennit vs our saliency
Zennit is timed as a user calls it: ``with Gradient(model, composite) as a: a(x, one_hot)``
(its canonizers and hooks applied and removed on every call).
"""
from __future__ import annotations

import os
from typing import List

import torch
import torchvision

from common import argument_parser, assert_same_up_to_rounding, finish, interleaved, machine_description, row

from zennit.attribution import Gradient
from zennit.composites import EpsilonPlusFlat
from zennit.torchvision import ResNetCanonizer, VGGCanonizer

import cnnviz_fast as cv
from cnnviz_fast import zoo

SIZES = {"vgg16": 4, "resnet18": 16}


def problem(arch: str, device: str, quick: bool, size: int):
    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):  # torchvision's 0 / 1 statistics would make BN the identity
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    model = model.eval().to(device)
    batch = 1 if quick else SIZES[arch]
    size = 64 if quick else size
    x = zoo.IMAGENET_NORMALIZE(torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(0)))
    targets = torch.arange(batch) * 37 % 1000
    name = {"vgg16": "VGG-16", "resnet18": "ResNet-18"}[arch]
    return model, x.to(device), targets.to(device), f"{device} {name} {batch}x3x{size}x{size}"


def bench(arch: str, quick: bool, device: str, size: int, rounds: int) -> List[dict]:
    model, x, targets, label = problem(arch, device, quick, size)
    composite = EpsilonPlusFlat(canonizers=[VGGCanonizer() if arch == "vgg16" else ResNetCanonizer()])
    one_hot = torch.eye(1000, device=device)[targets]

    def ours():
        return cv.lrp(model, x, targets, "epsilon_plus_flat")

    def saliency():
        return cv.saliency(model, x, targets)

    def zennit():
        with Gradient(model, composite) as attributor:
            return attributor(x.detach().requires_grad_(True), one_hot)[1]

    # Zennit's merged batch norm keeps its eps (x / sqrt(1 + 1e-5) per batch norm): ~1e-5 apart
    assert_same_up_to_rounding(ours(), zennit(), f"{label} lrp vs Zennit", tolerance=1e-3)
    t = interleaved({"lrp": ours, "saliency": saliency, "zennit": zennit}, 1 if quick else rounds)
    return [
        row(f"{label} lrp(epsilon_plus_flat) vs our saliency", t["lrp"], t["saliency"], "<= 1.5x", unit="s"),
        row(f"{label} lrp(epsilon_plus_flat) vs Zennit EpsilonPlusFlat", t["lrp"], t["zennit"], ">= 2x", unit="s"),
        row(f"{label} (info) our saliency vs Zennit: ratio = Zennit / saliency", t["saliency"], t["zennit"], "",
            unit="s"),
    ]


def main():
    parser = argument_parser(__doc__, tuple(SIZES))
    parser.add_argument("--size", type=int, default=224, help="image side (default 224)")
    parser.add_argument("--rounds", type=int, default=3, help="timing rounds (default 3)")
    args = parser.parse_args()
    print(machine_description(), flush=True)
    rows = [r for arch in args.only for r in bench(arch, args.quick, args.device, args.size, args.rounds)]
    load = os.getloadavg()
    finish(args, "lrp", rows, title="LRP (EpsilonPlusFlat) vs our saliency and Zennit 0.5.1",
           notes=("ratio = anchor / ours (speedup) for '>=' targets and the info rows; ours / anchor for '<=' "
                  f"targets. {1 if args.quick else args.rounds} rounds. Load average at the end (1, 5, 15 min): "
                  f"{load[0]:.1f}, {load[1]:.1f}, {load[2]:.1f}: the machine was shared with other jobs "
                  "while this ran, so the times are noisy; each contender's minimum over rounds is reported."))


if __name__ == "__main__":
    main()
