"""The 16-bit GPU paths of issue 21: their speed and their error against float32.

    python benchmarks/bench_gpu_paths.py [--quick] [--device cpu|cuda] [--no-write] [--only occlusion,pipeline]

  occlusion   ResNet-50 (torchvision, random weights), one 224-px image, 16-px windows at
              stride 8 (729 positions), mode="full": float32 vs dtype="bf16"; the bf16 map's
              error against float32 (max |diff| / max |map|, correlation).   target < 30 ms (bf16)
  pipeline    the pipeline's maps with its GPU defaults (bf16 autocast, channels-last) against
              float32 maps of the same 256 generated JPEGs (ResNet-18, saliency): median
              relative error per map, correlation, top-1 agreement (the "error against fp32" the
              README states for the defaults).
Results: benchmarks/results/gpu-paths-<machine>.{md,json}.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch

from common import argument_parser, finish, interleaved, machine_description, row

import cnnviz_fast as cv
from cnnviz_fast import zoo
from cnnviz_fast.pipeline import open_results, saliency_maps

SECTIONS = ("occlusion", "pipeline")


def bench_occlusion(rows, quick, device):
    import torchvision

    model = torchvision.models.resnet50().eval().to(device)
    size = 64 if quick else 224
    x = torch.randn(1, 3, size, size, device=device)
    target = int(model(x).argmax())
    fp32 = lambda: cv.occlusion(model, x, target, mode="full")  # noqa: E731
    bf16 = lambda: cv.occlusion(model, x, target, mode="full", dtype="bf16")  # noqa: E731
    exact, half = fp32(), bf16()
    error = float((half - exact).abs().max() / exact.abs().max())
    correlation = float(torch.corrcoef(torch.stack([half.flatten(), exact.flatten()]))[0, 1])
    times = interleaved({"fp32": fp32, "bf16": bf16}, 3 if quick else 5, 1)
    positions = ((size - 16 + 7) // 8 + 1) ** 2
    rows.append(row(f"{device} occlusion ResNet-50 1x3x{size}x{size}, {positions} positions, dtype=bf16 vs float32",
                    times["bf16"], times["fp32"], ">= 1x", max_error_vs_fp32=error, correlation=correlation,
                    bf16_ms=times["bf16"] * 1e3, goal="< 30 ms on an H200"))


def bench_pipeline(rows, quick, device):
    from bench_pipeline import make_jpegs

    model = zoo.resnet18().eval().to(device)
    count = 32 if quick else 256
    with tempfile.TemporaryDirectory() as work:
        folder = make_jpegs(Path(work) / "jpegs", count, 256, 3)
        maps = {}
        for name, options in (("fp32", dict(dtype="fp32", channels_last=False)), ("default", {})):
            saliency_maps(model, folder, Path(work) / name, normalize=zoo.IMAGENET_NORMALIZE, size=224,
                          batch_size=64, progress=False, map_dtype="float32", device=device, **options)
            maps[name] = open_results(Path(work) / name)
        a, b = maps["fp32"].maps().astype(np.float64), maps["default"].maps().astype(np.float64)
        agreement = float((maps["fp32"].predicted == maps["default"].predicted).mean())
    relative = np.abs(a - b).reshape(len(a), -1).max(1) / np.abs(a).reshape(len(a), -1).max(1)
    correlation = float(np.corrcoef(a.ravel(), b.ravel())[0, 1])
    rows.append({"name": f"{device} pipeline defaults (bf16 autocast on a GPU, channels-last) vs float32 maps, "
                         f"ResNet-18 saliency, {count} JPEGs",
                 "median_max_error_per_map": float(np.median(relative)), "correlation": correlation,
                 "top1_agreement": agreement})
    print(rows[-1], flush=True)


def main():
    args = argument_parser(__doc__, SECTIONS).parse_args()
    print(machine_description(), flush=True)
    rows = []
    for name in args.only:
        {"occlusion": bench_occlusion, "pipeline": bench_pipeline}[name](rows, args.quick, args.device)
    finish(args, "gpu-paths", rows, title="16-bit GPU paths: speed and error against float32",
           notes="Errors: max |bf16 - fp32| over a map / max |fp32 map| (per map; median over maps for the "
                 "pipeline). Random-weight models: maps of trained models are smoother, their errors smaller.")


if __name__ == "__main__":
    main()
