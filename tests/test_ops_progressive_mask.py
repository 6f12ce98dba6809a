"""cnnviz::progressive_mask: kernels vs reference vs brute force; gradients; opcheck; bad input."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import cnnviz_fast.ops as ops
from cnnviz_fast.ops import reference as ref
from op_cases import DTYPES, LAYOUTS, layout, needs_cuda, needs_ext

# (N, C, H, W), patch: odd sizes, patches clipped at the border, 1x1 images
GEOMETRIES = [
    ((2, 3, 7, 5), (1, 1)),
    ((1, 2, 8, 8), (4, 4)),
    ((3, 1, 5, 6), (2, 4)),
    ((2, 2, 1, 1), (1, 1)),
    ((1, 3, 9, 4), (9, 4)),
]


def brute(images, order, counts, baseline, mode, patch):
    """Loop over steps and over the ranked cells, writing each patch slice by hand."""
    N, C, H, W = images.shape
    ph, pw = patch
    cols = -(-W // pw)
    base = (baseline if torch.is_tensor(baseline) else torch.tensor(baseline)).to(images).expand(N, C, H, W)
    out = torch.empty(N, len(counts), C, H, W, dtype=images.dtype)
    for n in range(N):
        for k, count in enumerate(counts):
            x = images[n].clone() if mode == "deletion" else base[n].clone()
            src = base[n] if mode == "deletion" else images[n]
            for cell in order[n, :count].tolist():
                i, j = divmod(cell, cols)
                x[:, i * ph : (i + 1) * ph, j * pw : (j + 1) * pw] = src[:, i * ph : (i + 1) * ph, j * pw : (j + 1) * pw]
            out[n, k] = x
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", LAYOUTS)
@pytest.mark.parametrize("shape,patch", GEOMETRIES)
@pytest.mark.parametrize("mode", ["deletion", "insertion"])
def test_matches_reference_and_brute_force(device, dtype, kind, shape, patch, mode):
    images = layout(torch.randn(shape, device=device).to(dtype), kind)
    rows, cols = ops.progressive_grid(shape[2], shape[3], patch)
    R = rows * cols
    order = torch.randn(shape[0], R, device=device).argsort(1, descending=True)
    for baseline, counts in [
        (0.0, [0, R, R // 2, 1]),
        (-0.5, [R // 3]),
        (torch.randn(shape, device=device).to(dtype), list(range(R + 1))),
        (torch.randn(1, shape[1], 1, 1, device=device).to(dtype), [R, 0]),
    ]:
        out = ops.progressive_mask(images, order, counts, baseline, mode, patch)
        assert out.shape == (shape[0], len(counts), *shape[1:]) and out.dtype == dtype and out.is_contiguous()
        torch.testing.assert_close(out, ref.progressive_mask(images, order, counts, baseline, mode, patch), rtol=0, atol=0)
        b = baseline.cpu() if torch.is_tensor(baseline) else baseline
        torch.testing.assert_close(out.cpu(), brute(images.cpu(), order.cpu(), counts, b, mode, patch), rtol=0, atol=0)


def test_deletion_and_insertion_are_complementary():
    images = torch.randn(2, 3, 6, 7)
    order = torch.randn(2, 42).argsort(1)
    counts = [0, 5, 42]
    dele = ops.progressive_mask(images, order, counts, 0.0, "deletion")
    ins = ops.progressive_mask(images, order, counts, 0.0, "insertion")
    torch.testing.assert_close(dele + ins, images[:, None].expand_as(dele), rtol=0, atol=0)
    torch.testing.assert_close(dele[:, 0], images)  # nothing removed yet
    assert not ins[:, 0].any() and not dele[:, 2].any()


def test_empty_and_tensor_counts(device):
    images = torch.randn(0, 3, 5, 5, device=device)
    order = torch.empty(0, 25, dtype=torch.long, device=device)
    assert ops.progressive_mask(images, order, [1, 2]).shape == (0, 2, 3, 5, 5)
    images = torch.randn(2, 3, 5, 5, device=device)
    order = torch.randn(2, 25, device=device).argsort(1)
    assert ops.progressive_mask(images, order, []).shape == (2, 0, 3, 5, 5)
    torch.testing.assert_close(
        ops.progressive_mask(images, order, torch.tensor([3, 9])), ops.progressive_mask(images, order, [3, 9])
    )


def test_gradcheck(device):
    images = torch.randn(2, 2, 5, 4, dtype=torch.float64, device=device, requires_grad=True)
    scalar_base = torch.tensor(0.3, dtype=torch.float64, device=device, requires_grad=True)
    full_base = torch.randn(2, 2, 5, 4, dtype=torch.float64, device=device, requires_grad=True)
    bcast_base = torch.randn(2, 1, 1, dtype=torch.float64, device=device, requires_grad=True)
    order = torch.randn(2, 6, device=device).argsort(1)  # patch (2, 2): 3 x 2 cells
    for mode in ("deletion", "insertion"):
        for base, fast in ((scalar_base, False), (full_base, True), (bcast_base, True)):
            assert torch.autograd.gradcheck(
                lambda x, b: ops.progressive_mask(x, order, [0, 2, 6, 3], b, mode, (2, 2)), (images, base), fast_mode=fast
            )


def test_gradients_match_reference():
    images = torch.randn(2, 3, 7, 5, requires_grad=True)
    base = torch.randn(3, 1, 1, requires_grad=True)
    order = torch.randn(2, 35).argsort(1)
    grads = []
    for mod in (ops, ref):
        out = mod.progressive_mask(images, order, [1, 10, 30], base, "insertion")
        loss = (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum()
        grads.append(torch.autograd.grad(loss, (images, base)))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


@needs_ext
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(device, requires_grad):
    images = torch.randn(2, 3, 7, 5, device=device, requires_grad=requires_grad)
    ranks = ops.ranks_from_order(torch.randn(2, 12, device=device).argsort(1), 12)
    for base in (torch.tensor(0.5, device=device), torch.randn(2, 3, 7, 5, device=device)):
        base.requires_grad_(requires_grad)
        for insertion in (False, True):
            torch.library.opcheck(
                torch.ops.cnnviz.progressive_mask.default, (images, ranks, base, [0, 4, 12], [2, 2], insertion)
            )


def test_compile_fullgraph():
    order = torch.randn(2, 35).argsort(1)

    def f(x, b):
        return ops.progressive_mask(x, order, [0, 7, 35], b, "deletion").sum((2, 3, 4))

    x = torch.randn(2, 3, 7, 5, requires_grad=True)
    b = torch.randn(2, 3, 7, 5, requires_grad=True)
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    expected, got = f(x, b), compiled(x, b)
    torch.testing.assert_close(got, expected)
    for a, e in zip(torch.autograd.grad(got.sum(), (x, b)), torch.autograd.grad(expected.sum(), (x, b))):
        torch.testing.assert_close(a, e)


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cpu_matches_cuda(dtype):
    images = torch.randn(2, 3, 17, 13).to(dtype)
    base = torch.randn(2, 3, 17, 13).to(dtype)
    order = torch.randn(2, 9 * 5).argsort(1)
    cpu = ops.progressive_mask(images, order, [0, 3, 17, 45], base, "insertion", (2, 3))
    gpu = ops.progressive_mask(images.cuda(), order.cuda(), [0, 3, 17, 45], base.cuda(), "insertion", (2, 3))
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=0, atol=0)


# --------------------------------------------------------------------------- bad arguments
BAD = [
    (dict(images=torch.randn(3, 5, 5)), ValueError, "images"),
    (dict(images=torch.ones(1, 1, 5, 5, dtype=torch.int64)), TypeError, "images"),
    (dict(order=torch.arange(24)[None]), ValueError, "order"),
    (dict(order=torch.zeros(1, 25, dtype=torch.long)), ValueError, "order"),
    (dict(order=torch.arange(25)[None] + 1), ValueError, "order"),
    (dict(order=torch.arange(25.0)[None]), TypeError, "order"),
    (dict(order=torch.arange(25).repeat(2, 1)), ValueError, "order"),
    (dict(counts=[26]), ValueError, "counts"),
    (dict(counts=[-1]), ValueError, "counts"),
    (dict(counts=[1.5]), TypeError, "counts"),
    (dict(mode="delete"), ValueError, "mode"),
    (dict(patch=0), ValueError, "patch"),
    (dict(baseline=torch.randn(2, 5, 5)), ValueError, "baseline"),
    (dict(baseline="zero"), TypeError, "baseline"),
]


@pytest.mark.parametrize("bad,exc,name", BAD)
def test_bad_arguments(bad, exc, name):
    args = dict(images=torch.randn(1, 3, 5, 5), order=torch.arange(25)[None], counts=[0, 4], baseline=0.0, mode="deletion", patch=1)
    args.update(bad)
    with pytest.raises(exc, match=name):
        ops.progressive_mask(**args)


@needs_ext
def test_kernel_checks_name_arguments():
    img = torch.randn(1, 3, 5, 5)
    ranks = torch.arange(25)[None]
    base = torch.tensor(0.0)
    cases = [
        ((torch.randn(3, 5, 5), ranks, base, [1], [1, 1], False), "images must be a 4-D tensor"),
        ((img, ranks[:, :24], base, [1], [1, 1], False), "ranks must have shape"),
        ((img, ranks.int(), base, [1], [1, 1], False), "ranks must be an int64"),
        ((img, ranks, base, [26], [1, 1], False), "counts must lie in"),
        ((img, ranks, base, [1], [0, 1], False), "patch must be positive"),
        ((img, ranks, base.double(), [1], [1, 1], False), "baseline must have the images' dtype"),
        ((img, ranks, torch.zeros(3, 5, 5), [1], [1, 1], False), "baseline must have 1 element"),
    ]
    for args, msg in cases:
        with pytest.raises(RuntimeError, match=msg):
            torch.ops.cnnviz.progressive_mask(*args)


def test_works_without_extension():
    code = """
        import sys, warnings
        sys.modules["cnnviz_fast._C"] = None
        warnings.simplefilter("ignore")
        import torch, cnnviz_fast.ops as ops
        x = torch.randn(1, 1, 3, 3)
        out = ops.progressive_mask(x, torch.arange(9)[None], [0, 4], 0.0, "deletion")
        print(ops.has_extension(), int((out[0, 1, 0] == 0).sum()))
    """
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                         env=dict(os.environ, CNNVIZ_FORCE_REFERENCE="0"))
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["False", "4"]
