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

Each contender runs once to warm up, then ``--rounds`` times; the minimum is reported.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine_description, write_results  # noqa: E402

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


def best_of(fn, rounds):
    out = fn()  # warm-up (allocator, first-touch pages, lazy init)
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return min(times), out


def quantus_curve(model, x, y, maps, pixels_per_step, mode):
    """Quantus PixelFlipping scores [N, K] (deletion; insertion: from black, revealing x)."""
    C = x.shape[1]
    kwargs = dict(features_in_step=C * pixels_per_step, perturb_baseline=0.0, normalise=False, abs=False, disable_warnings=True,
                  display_progressbar=False)
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
    wrapped = PyTorchModel(model, channel_first=True, softmax=True, device="cpu")
    return np.asarray(metric.evaluate_batch(model=wrapped, x_batch=xb, y_batch=y.numpy(), a_batch=a))


def bench_curves(name, model, x, y, steps, rounds):
    N, C, H, W = x.shape
    assert (H * W) % steps == 0
    pixels_per_step = H * W // steps
    maps = torch.rand(N, H, W, generator=torch.Generator().manual_seed(0))
    rows = []
    for mode in ("deletion", "insertion"):
        fn = M.deletion_curve if mode == "deletion" else M.insertion_curve
        t_ours, curve = best_of(lambda: fn(model, x, y, maps, steps=steps, batch_size=BATCH), rounds)
        t_q, q = best_of(lambda: quantus_curve(model, x, y, maps, pixels_per_step, mode), rounds)
        err = float(np.abs(curve.scores[:, 1:].numpy() - q).max())
        assert q.shape == (N, steps) and err < 1e-5, (mode, q.shape, err)
        rows.append({"model": name, "metric": f"{mode} curve", "images": N, "size": f"{H}x{W}", "steps": steps,
                     "ours_s": t_ours, "anchor": "Quantus PixelFlipping", "anchor_s": t_q,
                     "speedup": t_q / t_ours, "max_abs_diff": err})
        print(rows[-1], flush=True)
    return rows


def bench_masks(name, x, steps, rounds):
    from quantus.functions.perturb_func import batch_baseline_replacement_by_indices

    N, C, H, W = x.shape
    pixels_per_step = H * W // steps
    maps = torch.rand(N, H, W, generator=torch.Generator().manual_seed(0))
    order = maps.flatten(1).argsort(dim=1, descending=True, stable=True)
    counts = M.step_counts(H * W, steps)[1:]

    def quantus_loop():
        a = np.broadcast_to(maps[:, None].numpy(), x.shape).reshape(N, -1)
        indices = np.argsort(-a, axis=1)
        cur, out = x.numpy().reshape(N, -1), []
        for k in range(steps):
            ix = indices[:, k * C * pixels_per_step : (k + 1) * C * pixels_per_step]
            cur = batch_baseline_replacement_by_indices(arr=cur, indices=ix, perturb_baseline=0.0)
            out.append(cur.reshape(x.shape))
        return np.stack(out, 1)

    t_ours, a = best_of(lambda: ops.progressive_mask(x, order, counts, 0.0, "deletion"), rounds)
    t_q, b = best_of(quantus_loop, rounds)
    assert np.array_equal(a.numpy(), b)
    row = {"model": "-", "metric": "deletion masks only", "images": N, "size": f"{H}x{W}", "steps": steps,
           "ours_s": t_ours, "anchor": "Quantus per-step replacement loop", "anchor_s": t_q,
           "speedup": t_q / t_ours, "max_abs_diff": 0.0}
    print(row, flush=True)
    return [row]


def gaussian_perturbation(x):
    noise = 0.05 * torch.randn(x.shape, dtype=x.dtype)
    return noise, x - noise


def bench_infidelity(name, model, x, y, rounds, samples=10):
    attr = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))

    def ours():
        torch.manual_seed(0)
        return M.infidelity(model, x, y, attr, gaussian_perturbation, n_perturb_samples=samples)

    def theirs():
        torch.manual_seed(0)
        return captum_infidelity(model, gaussian_perturbation, x, attr, target=y, n_perturb_samples=samples)

    t_ours, a = best_of(ours, rounds)
    t_c, b = best_of(theirs, rounds)
    err = float((a - b).abs().max() / b.abs().max())
    assert err < 1e-4, err
    row = {"model": name, "metric": "infidelity", "images": x.shape[0], "size": f"{x.shape[2]}x{x.shape[3]}",
           "steps": samples, "ours_s": t_ours, "anchor": "Captum infidelity", "anchor_s": t_c,
           "speedup": t_c / t_ours, "max_abs_diff": err}
    print(row, flush=True)
    return [row]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="digits model only")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads for both sides (default 1: the shared 2-core machine is oversubscribed)")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(machine_description(), "| extension:", ops.has_extension(), flush=True)
    rows = []
    digits = zoo.digits_cnn().eval()
    x = zoo.DIGITS_NORMALIZE(zoo.digits("test")[0][:8])
    with torch.no_grad():
        y = digits(x).argmax(1)
    rows += bench_curves("digits CNN", digits, x, y, steps=128, rounds=args.rounds)
    rows += bench_infidelity("digits CNN", digits, x, y, args.rounds)
    rows += bench_masks("digits", x, 128, args.rounds)
    if not args.quick:
        resnet = zoo.resnet18().eval()
        x = zoo.IMAGENET_NORMALIZE(torch.cat(list(zoo.sample_images(224).values())))  # china, flower
        with torch.no_grad():
            y = resnet(x).argmax(1)
        rows += bench_curves("ResNet-18 (random)", resnet, x, y, steps=98, rounds=args.rounds)
        rows += bench_infidelity("ResNet-18 (random)", resnet, x, y, args.rounds)
        rows += bench_masks("224", x, 98, args.rounds)
    if not args.no_write:
        notes = (
            "Same run, equal values checked first (curves: every point, max |diff| shown; infidelity: "
            "relative diff). CPU only (no GPU drawn for this session). Times: best of "
            f"{args.rounds} rounds, seconds per call for all images. Quantus's curve has K points "
            "(after each step) and AUC with dx=1; ours has K+1 points (from the clean image) and "
            "AUC over the fraction in [0, 1]. On a CPU both sides are bound by the same model forwards. "
            "Shared 2-core machine: see the load average."
        )
        print(write_results("metrics", rows, notes=notes, title="Faithfulness metrics vs Quantus / Captum"))


if __name__ == "__main__":
    main()
