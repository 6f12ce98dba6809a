"""Method-family benchmarks: each family's methods timed beside their anchors in the same run.

    python benchmarks/bench_families.py [--quick] [--only cams,...] [--batch N] [--size PX] [--no-write]

One function per section (``bench_<section>(args) -> rows``), listed in SECTIONS; each
checks equal values before timing and times with ``common.interleaved``. Results go to
benchmarks/results/families-<machine>.{md,json}; a run of some sections (``--only``)
replaces those sections' rows there and keeps the others', so each family's section can be
rerun alone.

cams (torchvision ResNet-18, 1000 classes, random weights, layer4, one class per image):
  each CAM (ours) vs pytorch-grad-cam's class of the same method       target: >= 2x faster
  cams(5 methods) in one call vs five pytorch-grad-cam calls           target: >= 3x faster
  FullGrad vs pytorch-grad-cam FullGrad                                target: >= 2x faster
"""
from __future__ import annotations

import json
import os
import warnings
from typing import List

import numpy as np
import torch
import torch.nn.functional as F
import torchvision

from common import (TIMING, argument_parser, assert_same_up_to_rounding, interleaved, machine, machine_description,
                    machine_tag, row, write_results)

from pytorch_grad_cam import (EigenCAM, EigenGradCAM, FullGrad, GradCAM, GradCAMElementWise, GradCAMPlusPlus,
                              HiResCAM, LayerCAM, XGradCAM)
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

import cnnviz_fast as cv
from cnnviz_fast import zoo

warnings.filterwarnings("ignore", module="captum")


ROUNDS = 3


def rounds_for(quick: bool) -> int:
    return 1 if quick else ROUNDS


def set_rounds(rounds: int) -> None:
    global ROUNDS
    ROUNDS = rounds


# --------------------------------------------------------------------------- cams
CAM_ANCHORS = {"grad_cam": GradCAM, "grad_cam_plus_plus": GradCAMPlusPlus, "xgrad_cam": XGradCAM,
               "hires_cam": HiResCAM, "layer_cam": LayerCAM, "grad_cam_elementwise": GradCAMElementWise,
               "eigen_cam": EigenCAM, "eigen_grad_cam": EigenGradCAM}
FIVE = ("grad_cam", "grad_cam_plus_plus", "xgrad_cam", "hires_cam", "layer_cam")


def resnet18_problem(batch: int, size: int):
    """torchvision's ResNet-18 (its blocks run the downsample last, as pytorch-grad-cam's
    FullGrad assumes), random weights and batch-norm statistics, ImageNet-normalised
    random images, one class per image."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    generator = torch.Generator().manual_seed(1)
    for module in model.modules():  # batch-norm biases that are not all zero (FullGrad reads them)
        if isinstance(module, torch.nn.BatchNorm2d):
            module.bias.data = torch.rand(module.bias.shape, generator=generator) - 0.5
            module.running_mean.data = torch.rand(module.running_mean.shape, generator=generator) - 0.5
            module.running_var.data = torch.rand(module.running_var.shape, generator=generator) + 0.5
    x = zoo.IMAGENET_NORMALIZE(torch.rand(batch, 3, size, size, generator=generator))
    targets = (torch.arange(batch) * 37 % 1000).tolist()
    return model, x, targets, f"cpu ResNet-18 {batch}x3x{size}x{size}"


def _relative(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours - ref).norm() / ref.norm().clamp_min(1e-30))


def check_cam(name: str, model, x, targets, cam) -> None:
    """Ours against pytorch-grad-cam's raw per-layer map (its get_cam_image on its own
    activations and gradients; the eigen projections oriented by our sign rule, as in
    tests/test_attribution_cams.py), ReLU'd and upsampled alike."""
    wanted = [ClassifierOutputTarget(t) for t in targets]
    outputs = cam.activations_and_grads(x)
    if cam.uses_gradients:
        sum(t(o) for t, o in zip(wanted, outputs)).backward()
    a = cam.activations_and_grads.activations[0].numpy()
    g = cam.activations_and_grads.gradients[0].numpy() if cam.uses_gradients else None
    raw = torch.from_numpy(np.asarray(cam.get_cam_image(x, None, wanted, a, g, False), dtype=np.float32))
    model.zero_grad(set_to_none=True)
    if name.startswith("eigen"):
        flip = raw.flatten(1).amin(1).neg() > raw.flatten(1).amax(1)
        raw = torch.where(flip[:, None, None], -raw, raw)
    ref = F.interpolate(raw.relu()[:, None], size=x.shape[2:], mode="bilinear", align_corners=False)[:, 0]
    error = _relative(getattr(cv, name)(model, x, "layer4", targets), ref)
    assert error < 1e-4, f"{name}: relative error {error:.2e} against pytorch-grad-cam"


def bench_cams(args) -> List[dict]:
    model, x, targets, label = resnet18_problem(args.batch, args.size)
    wanted = [ClassifierOutputTarget(t) for t in targets]
    target_tensor = torch.tensor(targets)
    rows = []
    anchors = {name: cls(model=model, target_layers=[model.layer4]) for name, cls in CAM_ANCHORS.items()}
    try:
        for name, cam in anchors.items():
            check_cam(name, model, x, targets, cam)
            contenders = {"ours": lambda: getattr(cv, name)(model, x, "layer4", target_tensor),
                          "theirs": lambda: cam(input_tensor=x, targets=wanted)}
            t = interleaved(contenders, rounds_for(args.quick))
            model.zero_grad(set_to_none=True)
            rows.append(row(f"{label} {name}(layer4) vs pytorch-grad-cam {type(cam).__name__}", t["ours"],
                            t["theirs"], ">= 2x"))

        five = {name: anchors[name] for name in FIVE}
        together = cv.cams(model, x, "layer4", target_tensor, methods=FIVE)
        for name in FIVE:  # the one-pass maps are the single methods' maps
            torch.testing.assert_close(together[name], getattr(cv, name)(model, x, "layer4", target_tensor))

        def separately():
            return [cam(input_tensor=x, targets=wanted) for cam in five.values()]

        t = interleaved({"ours": lambda: cv.cams(model, x, "layer4", target_tensor, methods=FIVE),
                         "theirs": separately}, rounds_for(args.quick))
        model.zero_grad(set_to_none=True)
        rows.append(row(f"{label} cams({', '.join(FIVE)}) one call vs 5 pytorch-grad-cam calls", t["ours"],
                        t["theirs"], ">= 3x"))
    finally:
        for cam in anchors.values():
            cam.activations_and_grads.release()

    with FullGrad(model=model, target_layers=[]) as full:  # (it prints that target_layers is ignored)
        theirs = full(input_tensor=x, targets=wanted)
        ours = cv.full_grad(model, x, target_tensor)
        flat = ours.flatten(1) - ours.flatten(1).amin(1, keepdim=True)
        ours = (flat / (1e-7 + flat.amax(1, keepdim=True))).reshape(theirs.shape)
        # a full backward: channels-last sums (core.layout) can flip a ReLU within rounding
        assert_same_up_to_rounding(ours, torch.from_numpy(theirs), "full_grad vs pytorch-grad-cam (scaled)")
        t = interleaved({"ours": lambda: cv.full_grad(model, x, target_tensor),
                         "theirs": lambda: full(input_tensor=x, targets=wanted)}, rounds_for(args.quick))
        model.zero_grad(set_to_none=True)
    rows.append(row(f"{label} full_grad vs pytorch-grad-cam FullGrad", t["ours"], t["theirs"], ">= 2x"))
    return rows


SECTIONS = {
    "cams": bench_cams,
}
NOTES = {
    "cams": ("cams: torchvision ResNet-18 (random weights and batch-norm statistics), layer4, one class per image; "
             "pytorch-grad-cam's CAM objects built once outside the timing (its call: forward, backward through "
             "the whole network with parameter gradients, numpy, per-image scaling and cv2 resize); ours: "
             "forward, backward from the target to layer4 only, maps upsampled in torch. Values checked before "
             "timing (relative error < 1e-4 against its raw per-layer map; FullGrad against its scaled output)."),
}


# --------------------------------------------------------------------------- results
def write_sections(args, rows: List[dict], sections: List[str]) -> str:
    """Rows of the sections run replace theirs in results/families-<machine>.json; the
    other sections' rows are kept; the .md table is rewritten from the union."""
    name = "families" + ("-quick" if args.quick else "")
    path = os.path.join(args.results_dir, f"{name}-{machine_tag(machine())}.json")
    kept: List[dict] = []
    if os.path.exists(path):
        with open(path) as f:
            kept = [r for r in json.load(f)["rows"] if r.get("section") not in sections]
    merged = kept + rows
    present = [s for s in SECTIONS if any(r.get("section") == s for r in merged)]
    notes = " ".join(NOTES.get(s, "") for s in present)
    notes += (f" ratio = anchor / ours (speedup) for '>=' targets. {rounds_for(args.quick)} rounds. Rows carry "
              f"their section; sections may come from different runs (load in each run's notes).")
    return write_results(name, merged, notes, "Method-family benchmarks (ours vs the anchors)",
                         directory=args.results_dir, timing=TIMING)


def main():
    parser = argument_parser(__doc__, SECTIONS)
    parser.add_argument("--batch", type=int, default=16, help="images per call (the issue's setting: 16)")
    parser.add_argument("--size", type=int, default=224, help="image side in pixels (default 224)")
    parser.add_argument("--rounds", type=int, default=ROUNDS, help=f"timing rounds (default {ROUNDS})")
    args = parser.parse_args()
    set_rounds(args.rounds)
    if args.device != "cpu":
        parser.error("--device: these sections run on the CPU (pytorch-grad-cam computes its maps in numpy)")
    print(machine_description(), flush=True)
    rows: List[dict] = []
    for section in args.only:
        load = machine()["load_avg_1min"]  # each section's rows say how busy the machine was
        for r in SECTIONS[section](args):
            r.update(section=section, load_1min=load)
            rows.append(r)
    missed = [r["name"] for r in rows if r.get("result") == "MISS"]
    print("all targets met" if not missed else f"targets missed: {missed}", flush=True)
    if not args.no_write:
        print("wrote", write_sections(args, rows, args.only), flush=True)


if __name__ == "__main__":
    main()
