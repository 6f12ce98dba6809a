"""Faithfulness-metric benchmarks: ours timed beside Quantus / Captum in the same run.

    python benchmarks/bench_metrics.py [--quick] [--no-write]

Deletion + insertion curves (cnnviz_fast.metrics, batches from ops.progressive_mask) vs
Quantus 0.6's ``PixelFlipping`` per-step loop (``evaluate_batch``, called directly: the
metric's ``__call__`` asserts that the step divides H*W, which no whole-pixel step of a
3-channel 224x224 image does). Deletion: baseline 0 (Quantus's "black" is the image
minimum), softmax probability of the target; insertion: the same loop started from the
zero image with a perturbation that reveals the original pixels. Models: the zoo digits
CNN (8 images, 32x32, 128 steps of 8 pixels) and a random-weight ResNet-18 (scikit-learn's
2 sample photos, 224x224, 98 steps of 512 pixels: the pixels per step must divide H*W for
Quantus's fixed step to match our ``floor(k * HW / K)`` schedule). Maps: random values
(no ties, so both sides rank the pixels identically). The curves are checked equal point
by point first (Quantus's curve omits our point 0, the unperturbed image).

Masks only: the K masked copies of each image, ``ops.progressive_mask`` (one call) vs
Quantus's per-step loop (``batch_baseline_replacement_by_indices`` on a running copy, one
copy kept per step, as ``PixelFlipping.evaluate_batch`` does), equal arrays checked first.

Infidelity vs Captum ``infidelity`` (same Gaussian-noise perturbation, same seed, equal
values checked first), 10 perturbations per image, one batch on both sides.

Timing: ``common.interleaved`` (the contenders in turn, round after round, the minimum over
rounds). Targets (issue 13): curves >= 5x Quantus, infidelity >= 3x Captum; the masks-only
rows are information. ``--quick``: the digits model only, 1 round.
"""
from __future__ import annotations

import os
import sys
import warnings

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import argument_parser, finish, interleaved, machine_description, row  # noqa: E402

import quantus  # noqa: E402
from quantus.helpers.model.pytorch_model import PyTorchModel  # noqa: E402
from captum.metrics import infidelity as captum_infidelity  # noqa: E402

import cnnviz_fast.metrics as M  # noqa: E402
from cnnviz_fast import ops, zoo  # noqa: E402

warnings.filterwarnings("ignore")

# masked images per forward on our side: on this CPU small batches run fastest per image
# (ResNet-18, 1 thread: 81 ms/image at batch 2, 84 at 8, 119 at 64); Quantus forwards the
# N images of each step together
BATCH = 8


def quantus_curve(model, x, y, maps, pixels_per_step, mode, device="cpu"):
    """Quantus PixelFlipping scores [N, K] (deletion; insertion: from black, revealing x)."""
    C = x.shape[1]
    kwargs = dict(features_in_step=C * pixels_per_step, perturb_baseline=0.0, normalise=False, abs=False, disable_warnings=True,
                  display_progressbar=False)
    x, y, maps = x.cpu(), y.cpu(), maps.cpu()  # Quantus takes numpy arrays and moves each step's batch
    a = np.ascontiguousarray(np.broadcast_to(maps[:, None].numpy(), x.shape))  # per channel, as Quantus ranks
    xb = x.numpy()
    if mode == "insertion":
        source = xb.reshape(xb.shape[0], -1)

        def reveal(arr, indices, **_):
            out = arr.copy()
            np.put_along_axis(out, indices, np.take_along_axis(source, indices, 1), 1)
            return out

        kwargs["perturb_func"] = reveal
        xb = np.zeros_like(xb)
    metric = quantus.PixelFlipping(**kwargs)
    # Quantus's per-step loop itself: its __call__ asserts that the step divides H*W, which no
    # whole-pixel step (a multiple of C=3 features) does at 224x224
    wrapped = PyTorchModel(model, channel_first=True, softmax=True, device=device)
    return np.asarray(metric.evaluate_batch(model=wrapped, x_batch=xb, y_batch=y.numpy(), a_batch=a))


def bench_curves(name, model, x, y, steps, rounds, batch=BATCH):
    N, C, H, W = x.shape
    assert (H * W) % steps == 0
    pixels_per_step = H * W // steps
    maps = torch.rand(N, H, W, generator=torch.Generator().manual_seed(0)).to(x.device)
    rows = []
    for mode in ("deletion", "insertion"):
        fn = M.deletion_curve if mode == "deletion" else M.insertion_curve
        ours = lambda: fn(model, x, y, maps, steps=steps, batch_size=batch)  # noqa: E731
        theirs = lambda: quantus_curve(model, x, y, maps, pixels_per_step, mode, str(x.device))  # noqa: E731
        curve, q = ours(), theirs()
        err = float(np.abs(curve.scores[:, 1:].cpu().numpy() - q).max())
        assert q.shape == (N, steps) and err < 1e-5 * (1 if x.device.type == "cpu" else 100), (mode, q.shape, err)
        t = interleaved({"ours": ours, "quantus": theirs}, rounds)
        rows.append(row(f"{name} {x.device.type}: {mode} curve, {N} images {H}x{W}, {steps} steps vs Quantus PixelFlipping",
                        t["ours"], t["quantus"], ">= 5x", unit="s", max_abs_diff=err))
    return rows


def bench_masks(name, x, steps, rounds):
    from quantus.functions.perturb_func import batch_baseline_replacement_by_indices

    N, C, H, W = x.shape
    pixels_per_step = H * W // steps
    maps = torch.rand(N, H, W, generator=torch.Generator().manual_seed(0))
    order = maps.flatten(1).argsort(dim=1, descending=True, stable=True).to(x.device)
    counts = M.step_counts(H * W, steps)[1:]

    def quantus_loop():
        a = np.broadcast_to(maps[:, None].numpy(), x.shape).reshape(N, -1)
        indices = np.argsort(-a, axis=1)
        cur, out = x.cpu().numpy().reshape(N, -1), []
        for k in range(steps):
            ix = indices[:, k * C * pixels_per_step : (k + 1) * C * pixels_per_step]
            cur = batch_baseline_replacement_by_indices(arr=cur, indices=ix, perturb_baseline=0.0)
            out.append(cur.reshape(x.shape))
        return np.stack(out, 1)

    ours = lambda: ops.progressive_mask(x, order, counts, 0.0, "deletion")  # noqa: E731
    assert np.array_equal(ours().cpu().numpy(), quantus_loop())
    t = interleaved({"ours": ours, "quantus": quantus_loop}, rounds)
    return [row(f"{name} {x.device.type}: deletion masks only, {N} images {H}x{W}, {steps} steps vs Quantus per-step loop",
                t["ours"], t["quantus"], unit="s", max_abs_diff=0.0)]


def gaussian_perturbation(x):
    noise = 0.05 * torch.randn(x.shape, dtype=x.dtype, device=x.device)
    return noise, x - noise


def bench_infidelity(name, model, x, y, rounds, samples=10):
    attr = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(x.device)

    def ours():
        torch.manual_seed(0)
        return M.infidelity(model, x, y, attr, gaussian_perturbation, n_perturb_samples=samples)

    def theirs():
        torch.manual_seed(0)
        return captum_infidelity(model, gaussian_perturbation, x, attr, target=y, n_perturb_samples=samples)

    a, b = ours(), theirs()
    err = float((a - b).abs().max() / b.abs().max())
    assert err < 1e-4, err
    t = interleaved({"ours": ours, "captum": theirs}, rounds)
    return [row(f"{name} {x.device.type}: infidelity, {x.shape[0]} images {x.shape[2]}x{x.shape[3]}, {samples} perturbations "
                "vs Captum", t["ours"], t["captum"], ">= 3x", unit="s", max_rel_diff=err)]


def main(argv=None):
    args = argument_parser(__doc__).parse_args(argv)
    rounds = 1 if args.quick else 2
    torch.manual_seed(0)
    print(machine_description(), "| extension:", ops.has_extension(), flush=True)
    rows = []
    if args.device == "cuda":  # Quantus moves each step's batch host -> device; we build batches on the GPU
        resnet = zoo.resnet18().eval().cuda()
        x = zoo.IMAGENET_NORMALIZE(torch.cat(list(zoo.sample_images(224).values()))).repeat(4, 1, 1, 1).cuda()
        with torch.no_grad():
            y = resnet(x).argmax(1)
        rows += bench_curves("ResNet-18 (random)", resnet, x, y, steps=98, rounds=rounds, batch=256)
        rows += bench_infidelity("ResNet-18 (random)", resnet, x, y, rounds)
        rows += bench_masks("224 px", x, 98, rounds)
        finish(args, "metrics", rows, "Same run, equal values checked first; GPU: 8 images of 224 px.",
               title="Faithfulness metrics vs Quantus / Captum")
        return
    digits = zoo.digits_cnn().eval()
    x = zoo.DIGITS_NORMALIZE(zoo.digits("test")[0][:8])
    with torch.no_grad():
        y = digits(x).argmax(1)
    rows += bench_curves("digits CNN", digits, x, y, steps=128, rounds=rounds)
    rows += bench_infidelity("digits CNN", digits, x, y, rounds)
    rows += bench_masks("digits", x, 128, rounds)
    if not args.quick:
        resnet = zoo.resnet18().eval()
        x = zoo.IMAGENET_NORMALIZE(torch.cat(list(zoo.sample_images(224).values())))  # china, flower
        with torch.no_grad():
            y = resnet(x).argmax(1)
        rows += bench_curves("ResNet-18 (random)", resnet, x, y, steps=98, rounds=rounds)
        rows += bench_infidelity("ResNet-18 (random)", resnet, x, y, rounds)
        rows += bench_masks("224 px", x, 98, rounds)
    notes = (
        "Same run, equal values checked first (curves: every point, max |diff| shown; infidelity: relative "
        "diff). CPU only (no GPU drawn for this session). Quantus's curve has K points (after each step) and "
        "AUC with dx=1; ours has K+1 points (from the clean image) and AUC over the fraction in [0, 1]. On a "
        "CPU both sides are bound by the same model forwards. Shared 2-core machine: see the load average."
    )
    finish(args, "metrics", rows, notes, title="Faithfulness metrics vs Quantus / Captum")


if __name__ == "__main__":
    main()
