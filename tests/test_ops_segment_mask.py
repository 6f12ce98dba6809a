"""cnnviz::segment_mask: kernels vs reference vs brute force; layouts; gradients; opcheck; bad input."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import cnnviz_fast.ops as ops
from cnnviz_fast.ops import reference as ref
from op_cases import DTYPES, LAYOUTS, layout, needs_cuda, needs_ext

# (N, C, H, W), K, R: odd sizes, one channel, 1x1 images, more rows than images
GEOMETRIES = [
    ((2, 3, 7, 5), 4, 5),
    ((1, 1, 6, 9), 3, 2),
    ((3, 2, 5, 6), 7, 8),
    ((2, 3, 1, 1), 2, 3),
    ((1, 4, 9, 4), 1, 1),
]


def case(shape, K, R, device="cpu"):
    """Segments with ids 0..K-1 (each image's own count may be smaller), a keep table, rows."""
    N, _, H, W = shape
    counts = torch.randint(1, K + 1, (N,))
    segments = torch.stack([torch.randint(0, int(k), (H, W)) for k in counts]).to(device)
    keep = torch.rand(R, K, device=device) < 0.5
    rows = torch.randint(0, N, (R,)).to(device)
    return segments, keep, rows


def brute(images, segments, keep, rows, baseline):
    """Pixel by pixel, as the definition reads."""
    N, C, H, W = images.shape
    base = (baseline if torch.is_tensor(baseline) else torch.tensor(baseline)).to(images).expand(N, C, H, W)
    out = torch.empty(keep.shape[0], C, H, W, dtype=images.dtype)
    for r, n in enumerate(rows.tolist()):
        for y in range(H):
            for x in range(W):
                kept = bool(keep[r, segments[n, y, x]])
                out[r, :, y, x] = images[n, :, y, x] if kept else base[n, :, y, x]
    return out


def expected_layout(images):
    cl = not images.is_contiguous() and images.is_contiguous(memory_format=torch.channels_last)
    return torch.channels_last if cl else torch.contiguous_format


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", LAYOUTS)
@pytest.mark.parametrize("shape,K,R", GEOMETRIES)
def test_matches_reference_and_brute_force(device, dtype, kind, shape, K, R):
    images = layout(torch.randn(shape, device=device).to(dtype), kind)
    segments, keep, rows = case(shape, K, R, device)
    for baseline in (0.0, -0.5, torch.randn(shape, device=device).to(dtype),
                     torch.randn(1, shape[1], 1, 1, device=device).to(dtype)):
        out = ops.segment_mask(images, segments, keep, rows, baseline)
        assert out.shape == (R, *shape[1:]) and out.dtype == dtype
        assert out.is_contiguous(memory_format=expected_layout(images))
        expected = ref.segment_mask(images, segments, keep, rows, ops._checks.baseline(baseline, images))
        assert expected.is_contiguous(memory_format=expected_layout(images))
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
        b = baseline.cpu() if torch.is_tensor(baseline) else baseline
        torch.testing.assert_close(out.cpu(), brute(images.cpu(), segments.cpu(), keep.cpu(), rows.cpu(), b),
                                   rtol=0, atol=0)


def test_channels_last_in_channels_last_out():
    images = torch.randn(2, 3, 8, 6).contiguous(memory_format=torch.channels_last)
    segments, keep, rows = case(images.shape, 5, 4)
    out = ops.segment_mask(images, segments, keep, rows, torch.randn(2, 3, 8, 6))
    assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
    assert ops.segment_mask(images.contiguous(), segments, keep, rows).is_contiguous()


def test_default_rows_empty_and_all_or_nothing(device):
    images = torch.randn(3, 2, 5, 4, device=device)
    segments, _, _ = case(images.shape, 3, 3, device)
    everything = torch.ones(3, 3, dtype=torch.bool, device=device)
    torch.testing.assert_close(ops.segment_mask(images, segments, everything), images, rtol=0, atol=0)
    nothing = ops.segment_mask(images, segments, ~everything, baseline=2.0)
    assert bool((nothing == 2).all())
    empty = ops.segment_mask(images, segments, everything[:0], torch.empty(0, dtype=torch.long, device=device))
    assert empty.shape == (0, 2, 5, 4)
    none = torch.randn(0, 2, 5, 4, device=device)
    assert ops.segment_mask(none, segments[:0], everything[:0], torch.empty(0, dtype=torch.long, device=device)
                            ).shape == (0, 2, 5, 4)


@needs_ext
def test_ids_outside_keep_show_the_baseline_unchecked():
    # check_values=False: the kernel reads no keep flag past its row, the pixel shows the baseline
    images = torch.randn(1, 2, 3, 3)
    segments = torch.tensor([[[0, 1, 5], [-1, 0, 1], [1, 1, 2]]])
    keep = torch.ones(1, 3, dtype=torch.bool)
    out = ops.segment_mask(images, segments, keep, torch.zeros(1, dtype=torch.long), 0.0, check_values=False)
    expected = ref.segment_mask(images, segments, keep, torch.zeros(1, dtype=torch.long), 0.0)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert bool((out[0, :, 0, 2] == 0).all()) and bool((out[0, :, 1, 0] == 0).all())


def test_gradcheck(device):
    images = torch.randn(2, 2, 4, 3, dtype=torch.float64, device=device, requires_grad=True)
    segments, keep, rows = case(images.shape, 3, 5, device)
    scalar = torch.tensor(0.3, dtype=torch.float64, device=device, requires_grad=True)
    full = torch.randn(2, 2, 4, 3, dtype=torch.float64, device=device, requires_grad=True)
    bcast = torch.randn(2, 1, 1, dtype=torch.float64, device=device, requires_grad=True)
    for base, fast in ((scalar, False), (full, True), (bcast, True)):
        assert torch.autograd.gradcheck(lambda x, b: ops.segment_mask(x, segments, keep, rows, b), (images, base),
                                        fast_mode=fast)


def test_gradients_match_reference():
    images = torch.randn(2, 3, 7, 5, requires_grad=True)
    base = torch.randn(3, 1, 1, requires_grad=True)
    segments, keep, rows = case(images.shape, 4, 6)
    grads = []
    for fn in (ops.segment_mask, ref.segment_mask):
        out = fn(images, segments, keep, rows, base)
        loss = (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum()
        grads.append(torch.autograd.grad(loss, (images, base)))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


@needs_ext
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(device, requires_grad):
    segments, keep, rows = case((2, 3, 7, 5), 4, 5, device)
    for kind in ("contiguous", "channels_last"):
        images = layout(torch.randn(2, 3, 7, 5, device=device), kind).requires_grad_(requires_grad)
        for base in (torch.tensor(0.5, device=device), torch.randn(2, 3, 7, 5, device=device)):
            base.requires_grad_(requires_grad)
            torch.library.opcheck(torch.ops.cnnviz.segment_mask.default, (images, segments, keep, rows, base))


def test_compile_fullgraph():
    segments, keep, rows = case((2, 3, 7, 5), 4, 5)

    def f(x, b):
        return ops.segment_mask(x, segments, keep, rows, b).sum((1, 2, 3))

    x = torch.randn(2, 3, 7, 5, requires_grad=True)
    b = torch.randn(2, 3, 7, 5, requires_grad=True)
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    expected, got = f(x, b), compiled(x, b)
    torch.testing.assert_close(got, expected)
    for a, e in zip(torch.autograd.grad(got.sum(), (x, b)), torch.autograd.grad(expected.sum(), (x, b))):
        torch.testing.assert_close(a, e)


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["contiguous", "channels_last"])
def test_cpu_matches_cuda(dtype, kind):
    images = layout(torch.randn(2, 3, 17, 13).to(dtype), kind)
    base = torch.randn(2, 3, 17, 13).to(dtype)
    segments, keep, rows = case(images.shape, 6, 9)
    cpu = ops.segment_mask(images, segments, keep, rows, base)
    gpu = ops.segment_mask(images.cuda(), segments.cuda(), keep.cuda(), rows.cuda(), base.cuda())
    assert gpu.stride() == cpu.stride()
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=0, atol=0)


# --------------------------------------------------------------------------- bad arguments
def _segments():
    return torch.tensor([[[0, 1, 2], [2, 1, 0], [0, 0, 1]]])


BAD = [
    (dict(images=torch.randn(3, 3, 3)), ValueError, "images"),
    (dict(images=torch.ones(1, 1, 3, 3, dtype=torch.int64)), TypeError, "images"),
    (dict(segments=torch.zeros(3, 3, dtype=torch.long)), ValueError, "segments"),
    (dict(segments=torch.zeros(1, 3, 3)), TypeError, "segments"),
    (dict(segments=_segments() + 1), ValueError, "segments"),
    (dict(segments=_segments() - 1), ValueError, "segments"),
    (dict(keep=torch.ones(2, 3)), TypeError, "keep"),
    (dict(keep=torch.ones(3, dtype=torch.bool)), ValueError, "keep"),
    (dict(rows=torch.zeros(3, dtype=torch.long)), ValueError, "rows"),
    (dict(rows=torch.tensor([0, 1])), ValueError, "rows"),
    (dict(rows=torch.tensor([0, -1])), ValueError, "rows"),
    (dict(rows=torch.zeros(2)), TypeError, "rows"),
    (dict(rows=None), ValueError, "rows"),
    (dict(baseline=torch.randn(3, 3, 3)), ValueError, "baseline"),
    (dict(baseline="zero"), TypeError, "baseline"),
]


@pytest.mark.parametrize("bad,exc,name", BAD)
def test_bad_arguments(bad, exc, name):
    args = dict(images=torch.randn(1, 2, 3, 3), segments=_segments(), keep=torch.ones(2, 3, dtype=torch.bool),
                rows=torch.zeros(2, dtype=torch.long), baseline=0.0)
    args.update(bad)
    with pytest.raises(exc, match=name):
        ops.segment_mask(**args)


@needs_ext
def test_kernel_checks_name_arguments():
    img = torch.randn(1, 2, 3, 3)
    seg, keep, rows, base = _segments(), torch.ones(2, 3, dtype=torch.bool), torch.zeros(2, dtype=torch.long), \
        torch.tensor(0.0)
    cases = [
        ((torch.randn(2, 3, 3), seg, keep, rows, base), "images must be a 4-D tensor"),
        ((img, seg[0], keep, rows, base), "segments must have shape"),
        ((img, seg.int(), keep, rows, base), "segments must be an int64"),
        ((img, seg, keep.float(), rows, base), "keep must be a bool"),
        ((img, seg, keep, rows[:1], base), "rows must have shape"),
        ((img, seg, keep, rows + 1, base), "rows must hold image indices"),
        ((img, seg, keep, rows, base.double()), "baseline must have the images' dtype"),
        ((img, seg, keep, rows, torch.zeros(2, 3, 3)), "baseline must have 1 element"),
    ]
    for args, msg in cases:
        with pytest.raises(RuntimeError, match=msg):
            torch.ops.cnnviz.segment_mask(*args)


def test_works_without_extension():
    code = """
        import sys, warnings
        sys.modules["cnnviz_fast._C"] = None
        warnings.simplefilter("ignore")
        import torch, cnnviz_fast.ops as ops
        x = torch.ones(1, 1, 2, 2)
        out = ops.segment_mask(x, torch.tensor([[[0, 1], [1, 1]]]), torch.tensor([[True, False]]))
        print(ops.has_extension(), int(out.sum()))
    """
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                         env=dict(os.environ, CNNVIZ_FORCE_REFERENCE="0"))
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["False", "1"]
