"""Benchmarks of the cnnviz ops against their anchors (timed in the same run).

    python benchmarks/bench_ops.py [--quick] [--device cpu|cuda] [--no-write]

Anchors (what people do today):
  gram_loss      autograd over torch.bmm(F, F^T) / S + F.mse_loss       target >= 1.6x (fwd+bwd)
  occlude        Captum's construction: one padded full-size mask per window,
                 x * (1 - mask) + baseline * mask                        target >= 3x
  occlusion_accumulate  Captum's mask sums: sum(delta * mask) / sum(mask) (masks prebuilt)
  guided_relu    nn.ReLU + register_full_backward_hook clamping the grad (Captum's way)
                                                                          target >= 1.3x (fwd+bwd)
Each op is also timed on its pure-PyTorch reference (cnnviz_fast.ops.reference).
Outputs are checked equal before timing. Results: benchmarks/results/ops-<machine>.{md,json}.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F
from torch.utils import benchmark

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine_description, write_results  # noqa: E402

import cnnviz_fast.ops as ops  # noqa: E402
from cnnviz_fast.ops import reference as ref  # noqa: E402


def timeit(fn, min_run_time, device):
    """Median seconds per call (torch.utils.benchmark synchronises CUDA)."""
    fn()  # warm-up
    t = benchmark.Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_run_time)
    return t.median


def row(op, shape, anchor_name, t_anchor, t_ops, t_ref, target):
    ratio = t_anchor / t_ops
    r = {
        "op": op,
        "shape": shape,
        "anchor": anchor_name,
        "anchor_ms": t_anchor * 1e3,
        "cnnviz_ms": t_ops * 1e3,
        "reference_ms": t_ref * 1e3 if t_ref is not None else "",
        "speedup_vs_anchor": ratio,
        "speedup_vs_reference": t_ref / t_ops if t_ref is not None else "",
        "target": f">= {target}x" if target else "",
        "result": ("PASS" if ratio >= target else "FAIL") if target else "",
    }
    print(
        f"{op:22s} {shape:22s} anchor {t_anchor * 1e3:9.2f} ms | cnnviz {t_ops * 1e3:9.2f} ms"
        + (f" | reference {t_ref * 1e3:9.2f} ms" if t_ref is not None else "")
        + f" | {ratio:5.2f}x" + (f" (target {target}x: {r['result']})" if target else ""),
        flush=True,
    )
    return r


# --------------------------------------------------------------------------- gram_loss
def bench_gram_loss(shape, device, min_run_time):
    N, C, S = shape
    feats = torch.randn(N, C, S, device=device, requires_grad=True)
    target = ref.gram(torch.randn(N, C, S, device=device))

    def anchor():
        f = feats.flatten(2)
        g = torch.bmm(f, f.transpose(1, 2)) / f.shape[2]
        loss = F.mse_loss(g, target)
        return loss, torch.autograd.grad(loss, feats)[0]

    def ours():
        loss = ops.gram_loss(feats, target)
        return loss, torch.autograd.grad(loss, feats)[0]

    def reference():
        loss = ref.gram_loss(feats, target)
        return loss, torch.autograd.grad(loss, feats)[0]

    (la, ga), (lo, go) = anchor(), ours()
    torch.testing.assert_close(lo, la, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(go, ga, rtol=1e-3, atol=1e-6 * ga.abs().max().item())
    return row(
        "gram_loss fwd+bwd", f"[{N},{C},{S}]", "bmm + mse_loss (autograd)",
        timeit(anchor, min_run_time, device), timeit(ours, min_run_time, device),
        timeit(reference, min_run_time, device), 1.6,
    )


# --------------------------------------------------------------------------- occlusion
def captum_masks(x, window, stride):
    """Captum's per-window masks ([P, 1, C, H, W], int64), in our row-major window order."""
    from captum.attr import Occlusion

    _, C, H, W = x.shape
    rows, cols = ops.occlusion_grid(H, W, window, stride)
    occ = Occlusion(lambda t: t)
    sliding = torch.ones((C, *window), device=x.device)
    return torch.stack(
        [
            occ._occlusion_mask(x, (p % cols) * rows + p // cols, sliding, (1, *stride), (1, rows, cols), False)
            for p in range(rows * cols)
        ],
        0,
    ).long()


def bench_occlude(device, min_run_time):
    window, stride, baseline = (16, 16), (8, 8), 0.0
    x = torch.randn(1, 3, 224, 224, device=device)
    rows, cols = ops.occlusion_grid(224, 224, window, stride)
    P = rows * cols

    def anchor():  # Captum's Occlusion._construct_ablated_input_across_tensors, one image, P windows
        mask = captum_masks(x, window, stride)
        expanded = x.repeat(P, 1, 1, 1).reshape(P, 1, 3, 224, 224)
        out = expanded * (torch.ones(1, dtype=torch.long, device=device) - mask).to(x.dtype) + baseline * mask.to(x.dtype)
        return out.reshape(P, 3, 224, 224)

    def ours():
        return ops.occlude(x, window, stride, baseline).reshape(P, 3, 224, 224)

    def reference():
        return ref.occlude(x, window, stride, baseline).reshape(P, 3, 224, 224)

    torch.testing.assert_close(ours(), anchor(), rtol=0, atol=0)
    rows_out = [
        row(
            "occlude", f"{P} x [3,224,224]", "Captum full-size masks",
            timeit(anchor, min_run_time, device), timeit(ours, min_run_time, device),
            timeit(reference, min_run_time, device), 3.0,
        )
    ]

    deltas = torch.randn(1, P, device=device)
    m = captum_masks(x, window, stride)[:, 0, 0].to(x.dtype)  # [P, H, W], prebuilt (favours the anchor)

    def acc_anchor():
        return ((deltas[0, :, None, None] * m).sum(0) / m.sum(0))[None]

    def acc_ours():
        return ops.occlusion_accumulate(deltas, 224, 224, window, stride)

    def acc_reference():
        return ref.occlusion_accumulate(deltas, 224, 224, window, stride)

    torch.testing.assert_close(acc_ours(), acc_anchor(), rtol=1e-5, atol=1e-5)
    rows_out.append(
        row(
            "occlusion_accumulate", f"{P} deltas -> [224,224]", "mask sums (masks prebuilt)",
            timeit(acc_anchor, min_run_time, device), timeit(acc_ours, min_run_time, device),
            timeit(acc_reference, min_run_time, device), None,
        )
    )
    return rows_out


# --------------------------------------------------------------------------- guided_relu
def bench_guided_relu(shape, device, min_run_time):
    x = torch.randn(shape, device=device, requires_grad=True)
    grad = torch.randn(shape, device=device)
    relu = torch.nn.ReLU()
    relu.register_full_backward_hook(lambda mod, gin, gout: (F.relu(gin[0]),))

    def anchor():
        return torch.autograd.grad(relu(x), x, grad)[0]

    def ours():
        return torch.autograd.grad(ops.guided_relu(x, "guided"), x, grad)[0]

    def reference():
        return torch.autograd.grad(ref.guided_relu(x, "guided"), x, grad)[0]

    torch.testing.assert_close(ours(), anchor(), rtol=0, atol=0)
    return row(
        "guided_relu fwd+bwd", str(list(shape)).replace(" ", ""), "nn.ReLU + full backward hook",
        timeit(anchor, min_run_time, device), timeit(ours, min_run_time, device),
        timeit(reference, min_run_time, device), 1.3,
    )


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true", help="shorter timing (noisier)")
    p.add_argument("--no-write", action="store_true", help="do not write benchmarks/results")
    p.add_argument("--only", choices=["gram", "occlusion", "guided"], action="append")
    args = p.parse_args()
    min_run_time = 0.5 if args.quick else 2.0
    only = set(args.only or ["gram", "occlusion", "guided"])

    print(f"machine: {machine_description()}")
    print(f"cnnviz_fast.ops: {'compiled extension' if ops.has_extension() else 'REFERENCE PATH (no extension)'}")
    rows = []
    with torch.no_grad():
        pass
    if "gram" in only:
        for shape in [(4, 256, 3136), (1, 512, 4096)]:
            rows.append(bench_gram_loss(shape, args.device, min_run_time))
    if "occlusion" in only:
        rows += bench_occlude(args.device, min_run_time)
    if "guided" in only:
        rows.append(bench_guided_relu((16, 64, 56, 56), args.device, min_run_time))

    failed = [r for r in rows if r["result"] == "FAIL"]
    print("all targets met" if not failed else f"targets missed: {[r['op'] + ' ' + r['shape'] for r in failed]}")
    if not args.no_write:
        notes = (
            f"Device: {args.device}; path: {'compiled extension' if ops.has_extension() else 'reference'}; "
            f"median of torch.utils.benchmark blocked_autorange(min_run_time={min_run_time}). "
            "speedup = anchor time / cnnviz time. Regenerate: `python benchmarks/bench_ops.py`."
        )
        path = write_results(f"ops-{args.device}" if args.device != "cpu" else "ops", rows, notes, "cnnviz ops vs anchors")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
