"""Benchmarks of the cnnviz ops against their anchors (timed in the same run).

    python benchmarks/bench_ops.py [--quick] [--device cpu|cuda] [--only gram,occlusion,guided] [--no-write]

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

import torch
import torch.nn.functional as F

from common import argument_parser, finish, interleaved, machine_description, row

import cnnviz_fast.ops as ops
from cnnviz_fast.ops import reference as ref


def op_row(name, anchor, ours, reference, target, rounds):
    """The row of one op: ours against the anchor, timed in the same rounds as the op's
    pure-PyTorch reference (reported beside it)."""
    t = interleaved({"anchor": anchor, "ours": ours, "reference": reference}, rounds)
    return row(name, t["ours"], t["anchor"], target, reference_ms=t["reference"] * 1e3,
               speedup_vs_reference=t["reference"] / t["ours"])


# --------------------------------------------------------------------------- gram_loss
def bench_gram_loss(shape, device, rounds):
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
    # float32 sums over S = thousands of products, in other orders: ~1e-6 of the largest entry
    torch.testing.assert_close(go, ga, rtol=1e-3, atol=1e-5 * ga.abs().max().item())
    return op_row(f"{device} gram_loss fwd+bwd [{N},{C},{S}] vs bmm + mse_loss (autograd)", anchor, ours, reference,
                  ">= 1.6x", rounds)


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


def bench_occlude(device, rounds):
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
    rows_out = [op_row(f"{device} occlude {P} x [3,224,224] vs Captum full-size masks", anchor, ours, reference,
                       ">= 3x", rounds)]

    deltas = torch.randn(1, P, device=device)
    m = captum_masks(x, window, stride)[:, 0, 0].to(x.dtype)  # [P, H, W], prebuilt (favours the anchor)

    def acc_anchor():
        return ((deltas[0, :, None, None] * m).sum(0) / m.sum(0))[None]

    def acc_ours():
        return ops.occlusion_accumulate(deltas, 224, 224, window, stride)

    def acc_reference():
        return ref.occlusion_accumulate(deltas, 224, 224, window, stride)

    torch.testing.assert_close(acc_ours(), acc_anchor(), rtol=1e-5, atol=1e-5)
    rows_out.append(op_row(f"{device} occlusion_accumulate {P} deltas -> [224,224] vs mask sums (masks prebuilt)",
                           acc_anchor, acc_ours, acc_reference, "", rounds))
    return rows_out


# --------------------------------------------------------------------------- guided_relu
def bench_guided_relu(shape, device, rounds):
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
    shape = str(list(shape)).replace(" ", "")
    return op_row(f"{device} guided_relu fwd+bwd {shape} vs nn.ReLU + full backward hook", anchor, ours, reference,
                  ">= 1.3x", rounds)


# --------------------------------------------------------------------------- GPU sizes
def bench_gpu_sizes(rounds):
    """CUDA only, information rows: each kernel on a problem that fills the GPU, against the
    plain PyTorch call that moves the same bytes or does the same products, with our
    achieved bandwidth (bytes read + written once / time)."""
    out = []
    x = torch.randn(4, 3, 224, 224, device="cuda")
    window, stride = (16, 16), (8, 8)
    P = ops.occlusion_grid(224, 224, window, stride)[0] * ops.occlusion_grid(224, 224, window, stride)[1]
    written = x.numel() * P * x.element_size()
    t = interleaved({"ours": lambda: ops.occlude(x, window, stride, 0.0),
                     "copy": lambda: x[:, None].expand(4, P, 3, 224, 224).clone()}, rounds)
    out.append(row(f"cuda occlude 4 x {P} x [3,224,224] fp32 vs expand().clone() (same bytes written)",
                   t["ours"], t["copy"], "", ours_gb_s=written / t["ours"] / 1e9))
    for dtype in (torch.float32, torch.float16):
        y = torch.randn(32, 64, 112, 112, device="cuda", dtype=dtype)
        g = torch.randn_like(y)
        moved = 3 * y.numel() * y.element_size()  # backward: read x and grad, write grad_in
        t = interleaved({"ours": lambda: ops.guided_relu_backward(g, y, "guided"),
                         "plain": lambda: torch.where(y > 0, g.clamp(min=0), 0)}, rounds)
        out.append(row(f"cuda guided_relu backward [32,64,112,112] {str(dtype)[6:]} vs torch.where (same bytes)",
                       t["ours"], t["plain"], "", ours_gb_s=moved / t["ours"] / 1e9))
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        f = torch.randn(8, 512, 3136, device="cuda", dtype=dtype)
        flops = 2 * 8 * 512 * 512 * 3136
        t = interleaved({"ours": lambda: ops.gram(f),
                         "bmm": lambda: torch.bmm(f, f.transpose(1, 2)).div_(f.shape[2])}, rounds)
        out.append(row(f"cuda gram [8,512,3136] {str(dtype)[6:]} vs torch.bmm in the same dtype",
                       t["ours"], t["bmm"], "", ours_tflop_s=flops / t["ours"] / 1e12))
    return out


SECTIONS = ("gram", "occlusion", "guided", "gpu-sizes")


def main():
    parser = argument_parser(__doc__, SECTIONS)
    args = parser.parse_args()
    rounds = 3 if args.quick else 10
    path = "compiled extension" if ops.has_extension() else "REFERENCE PATH (no extension)"
    print(f"machine: {machine_description()}\ncnnviz_fast.ops: {path}")
    rows = []
    if "gram" in args.only:
        rows += [bench_gram_loss(shape, args.device, rounds) for shape in [(4, 256, 3136), (1, 512, 4096)]]
    if "occlusion" in args.only:
        rows += bench_occlude(args.device, rounds)
    if "guided" in args.only:
        rows.append(bench_guided_relu((16, 64, 56, 56), args.device, rounds))
    if "gpu-sizes" in args.only and args.device == "cuda":
        rows += bench_gpu_sizes(rounds)
    finish(args, "ops" if args.device == "cpu" else f"ops-{args.device}", rows, title="cnnviz ops vs anchors",
           notes=f"Device: {args.device}; path: {path}; {rounds} rounds. ratio = anchor / ours (speedup); "
                 "speedup_vs_reference = our pure-PyTorch reference / ours.")


if __name__ == "__main__":
    main()
