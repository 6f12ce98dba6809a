"""cnnviz::occlude and cnnviz::occlusion_accumulate: kernels vs reference vs brute force vs Captum."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import cnnviz_fast.ops as ops
from cnnviz_fast.ops import reference as ref
from op_cases import DTYPES, LAYOUTS, layout, needs_cuda, needs_ext

# (rtol, atol) of occlusion_accumulate per dtype (occlude is an exact copy)
TOL = {
    torch.float32: (1e-5, 1e-5),
    torch.float64: (1e-12, 1e-12),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (2e-2, 2e-2),
}
# (N, C, H, W), window, stride: odd sizes, windows clipped at the border, 1x1 images
GEOMETRIES = [
    ((2, 3, 7, 5), (3, 2), (2, 3)),
    ((1, 2, 8, 8), (4, 4), (4, 4)),
    ((3, 1, 5, 6), (5, 1), (1, 2)),
    ((2, 2, 1, 1), (1, 1), (1, 1)),
    ((1, 3, 9, 4), (2, 3), (5, 5)),  # stride > window: uncovered pixels, a window past the border
]



def brute_occlude(images, window, stride, baseline, first, count):
    N, C, H, W = images.shape
    (kh, kw), (sh, sw) = window, stride
    cols = -(-(W - kw) // sw) + 1
    base = (baseline if torch.is_tensor(baseline) else torch.tensor(baseline)).to(images).expand(N, C, H, W)
    out = []
    for p in range(first, first + count):
        i, j = p // cols, p % cols
        x = images.clone()
        x[:, :, i * sh : i * sh + kh, j * sw : j * sw + kw] = base[:, :, i * sh : i * sh + kh, j * sw : j * sw + kw]
        out.append(x)
    return torch.stack(out, 1) if out else images.new_empty(N, 0, C, H, W)


def brute_accumulate(deltas, H, W, window, stride):
    (kh, kw), (sh, sw) = window, stride
    rows, cols = ops.occlusion_grid(H, W, window, stride)
    total = torch.zeros(deltas.shape[0], H, W, dtype=torch.float64)
    cnt = torch.zeros(H, W, dtype=torch.float64)
    for p in range(rows * cols):
        i, j = p // cols, p % cols
        total[:, i * sh : i * sh + kh, j * sw : j * sw + kw] += deltas[:, p, None, None].double()
        cnt[i * sh : i * sh + kh, j * sw : j * sw + kw] += 1
    return torch.where(cnt > 0, total / cnt.clamp_min(1), 0.0)


# --------------------------------------------------------------------------- occlude
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", LAYOUTS)
@pytest.mark.parametrize("shape,window,stride", GEOMETRIES)
def test_occlude_matches_reference_and_brute_force(device, dtype, kind, shape, window, stride):
    images = layout(torch.randn(shape, device=device).to(dtype), kind)
    rows, cols = ops.occlusion_grid(shape[2], shape[3], window, stride)
    for baseline, first, count in [
        (0.0, 0, rows * cols),
        (0.5, rows * cols // 2, rows * cols - rows * cols // 2),
        (torch.randn(shape, device=device).to(dtype), 0, rows * cols),
        (torch.randn(1, shape[1], 1, 1, device=device).to(dtype), 0, 1),
    ]:
        out = ops.occlude(images, window, stride, baseline, first, count)
        assert out.shape == (shape[0], count, *shape[1:]) and out.dtype == dtype and out.is_contiguous()
        torch.testing.assert_close(out, ref.occlude(images, window, stride, baseline, first, count), rtol=0, atol=0)
        torch.testing.assert_close(
            out.cpu(), brute_occlude(images.cpu(), window, stride, baseline.cpu() if torch.is_tensor(baseline) else baseline, first, count), rtol=0, atol=0
        )


def test_occlude_defaults_and_reshape_layout():
    images = torch.randn(2, 3, 6, 6)
    out = ops.occlude(images, 3, 3)  # all 4 positions, baseline 0
    assert out.shape == (2, 4, 3, 6, 6)
    batch = out.reshape(8, 3, 6, 6)  # image-major: image n, position k at n * count + k
    torch.testing.assert_close(batch[5], brute_occlude(images, (3, 3), (3, 3), 0.0, 0, 4)[1, 1])


def test_occlude_empty(device):
    images = torch.randn(0, 3, 5, 5, device=device)
    assert ops.occlude(images, 2, 2, 0.0).shape == (0, 9, 3, 5, 5)
    images = torch.randn(2, 3, 5, 5, device=device)
    assert ops.occlude(images, 2, 2, 0.0, first=3, count=0).shape == (2, 0, 3, 5, 5)


# The kernels copy a row in 16-byte packs when W is a multiple of a pack and the buffers are
# aligned, element by element otherwise: widths on and off the pack size, windows starting and
# ending inside a pack, rows of more packs than a warp has threads, and buffers starting one
# element into their storage (a contiguous view that is not 16-byte aligned).
ROW_CASES = [
    ((2, 3, 9, 64), (4, 7), (3, 5)),
    ((1, 2, 6, 36), (3, 9), (2, 6)),
    ((1, 1, 5, 300), (2, 33), (3, 41)),
    ((2, 2, 4, 7), (3, 3), (1, 2)),
]


def _one_element_in(x):
    """``x``'s values in a contiguous tensor whose data starts one element into its storage."""
    out = torch.empty(x.numel() + 1, dtype=x.dtype, device=x.device)[1:].view(x.shape)
    out.copy_(x)
    assert out.is_contiguous() and out.data_ptr() % 16 != 0
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("offset", ["none", "images", "baseline"])
@pytest.mark.parametrize("shape,window,stride", ROW_CASES)
def test_occlude_row_packing(device, dtype, offset, shape, window, stride):
    images = torch.randn(shape, device=device).to(dtype)
    full = torch.randn(shape, device=device).to(dtype)
    if offset == "images":
        images = _one_element_in(images)
    elif offset == "baseline":
        full = _one_element_in(full)
    rows, cols = ops.occlusion_grid(shape[2], shape[3], window, stride)
    first, count = 1, rows * cols - 1
    for baseline in (-1.5, full):
        out = ops.occlude(images, window, stride, baseline, first, count)
        torch.testing.assert_close(out, ref.occlude(images, window, stride, baseline, first, count), rtol=0, atol=0)
        brute = brute_occlude(images.cpu(), window, stride, baseline.cpu() if torch.is_tensor(baseline) else baseline, first, count)
        torch.testing.assert_close(out.cpu(), brute, rtol=0, atol=0)


@needs_cuda
@needs_ext
def test_occlude_numeric_baseline_does_not_sync():
    images = torch.randn(2, 3, 8, 8, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # a host-to-device copy of the baseline would raise
    try:
        out = ops.occlude(images, 3, 2, 0.5)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.testing.assert_close(out, ref.occlude(images, (3, 3), (2, 2), 0.5, 0, out.shape[1]), rtol=0, atol=0)


def _captum_masks(images, window, stride):
    """Captum's own occlusion masks, renumbered to our row-major positions."""
    from captum.attr import Occlusion

    N, C, H, W = images.shape
    rows, cols = ops.occlusion_grid(H, W, window, stride)
    occ = Occlusion(lambda x: x.sum())
    sliding = torch.ones((C, *window))
    shift_counts = (1, rows, cols)
    masks = []
    for p in range(rows * cols):
        i, j = p // cols, p % cols  # Captum numbers features with the row index fastest
        m = occ._occlusion_mask(images, i + rows * j, sliding, (1, *stride), shift_counts, False)
        masks.append(m[0])
    return torch.stack(masks)  # [P, C, H, W]


@pytest.mark.parametrize("shape,window,stride", GEOMETRIES[:4])  # Captum fails on stride > window
def test_occlude_and_accumulate_match_captum_mask_arithmetic(shape, window, stride):
    images = torch.randn(shape, dtype=torch.float64)
    baseline = torch.randn(shape, dtype=torch.float64)
    masks = _captum_masks(images, window, stride).to(images)
    expected = images[:, None] * (1 - masks[None]) + baseline[:, None] * masks[None]
    torch.testing.assert_close(ops.occlude(images, window, stride, baseline), expected, rtol=0, atol=0)

    deltas = torch.randn(shape[0], masks.shape[0], dtype=torch.float64)
    m = masks[:, 0]  # [P, H, W]
    num = torch.einsum("np,phw->nhw", deltas, m)
    den = m.sum(0)
    expected = torch.where(den > 0, num / den.clamp_min(1), 0.0)
    torch.testing.assert_close(ops.occlusion_accumulate(deltas, shape[2], shape[3], window, stride), expected)


def test_end_to_end_equals_captum_occlusion():
    from captum.attr import Occlusion

    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Tanh(), torch.nn.Flatten(), torch.nn.LazyLinear(5)).double()
    images = torch.randn(2, 3, 11, 9, dtype=torch.float64)
    model(images)
    window, stride, target = (4, 3), (3, 2), 2
    expected = Occlusion(model).attribute(
        images, sliding_window_shapes=(3, *window), strides=(1, *stride), baselines=0.25, target=target
    )
    with torch.no_grad():
        occluded = ops.occlude(images, window, stride, 0.25)
        N, P = occluded.shape[:2]
        out = model(occluded.reshape(N * P, 3, 11, 9))[:, target].reshape(N, P)
        deltas = model(images)[:, target, None] - out
    attr = ops.occlusion_accumulate(deltas, 11, 9, window, stride)
    # Captum accumulates its attribution in float32
    torch.testing.assert_close(attr[:, None].expand_as(expected), expected, check_dtype=False, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- accumulate
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,window,stride", GEOMETRIES)
def test_accumulate_matches_reference_and_brute_force(device, dtype, shape, window, stride):
    N, _, H, W = shape
    rows, cols = ops.occlusion_grid(H, W, window, stride)
    base = torch.randn(N, 2 * rows * cols, device=device).to(dtype)
    for deltas in (base[:, ::2], base[:, : rows * cols].contiguous()):  # non-contiguous and contiguous
        out = ops.occlusion_accumulate(deltas, H, W, window, stride)
        assert out.shape == (N, H, W) and out.dtype == dtype
        rtol, atol = TOL[dtype]
        torch.testing.assert_close(out, ref.occlusion_accumulate(deltas, H, W, window, stride), rtol=rtol, atol=atol)
        torch.testing.assert_close(
            out.cpu().double(), brute_accumulate(deltas.cpu(), H, W, window, stride), rtol=rtol, atol=atol
        )


def test_accumulate_empty_batch(device):
    out = ops.occlusion_accumulate(torch.randn(0, 9, device=device), 5, 5, 2, 2)
    assert out.shape == (0, 5, 5)


def test_accumulate_large_grid_precision():
    # 27 x 27 windows on 224 x 224, float32 vs a float64 brute force
    deltas = torch.randn(1, 729)
    out = ops.occlusion_accumulate(deltas, 224, 224, 16, 8)
    torch.testing.assert_close(out.double(), brute_accumulate(deltas, 224, 224, (16, 16), (8, 8)), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- gradients
def test_occlude_gradcheck(device):
    images = torch.randn(2, 2, 5, 4, dtype=torch.float64, device=device, requires_grad=True)
    scalar_base = torch.tensor(0.3, dtype=torch.float64, device=device, requires_grad=True)
    full_base = torch.randn(2, 2, 5, 4, dtype=torch.float64, device=device, requires_grad=True)
    bcast_base = torch.randn(2, 1, 1, dtype=torch.float64, device=device, requires_grad=True)
    for base, fast in ((scalar_base, False), (full_base, True), (bcast_base, True)):
        assert torch.autograd.gradcheck(
            lambda x, b: ops.occlude(x, (3, 2), (2, 3), b, 1, 3), (images, base), fast_mode=fast
        )


def test_accumulate_gradcheck(device):
    deltas = torch.randn(2, 6, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(lambda d: ops.occlusion_accumulate(d, 7, 5, (3, 2), (2, 3)), (deltas,))
    deltas = torch.randn(1, 6, dtype=torch.float64, device=device, requires_grad=True)  # uncovered pixels
    assert torch.autograd.gradcheck(lambda d: ops.occlusion_accumulate(d, 9, 4, (2, 3), (5, 5)), (deltas,))


def test_gradients_match_reference():
    images = torch.randn(2, 3, 7, 5, requires_grad=True)
    base = torch.randn(3, 1, 1, requires_grad=True)
    deltas = torch.randn(2, 6, requires_grad=True)
    grads = []
    for mod in (ops, ref):
        out = mod.occlude(images, (3, 2), (2, 3), base)
        acc = mod.occlusion_accumulate(deltas, 7, 5, (3, 2), (2, 3))
        loss = (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum() + (acc * acc).sum()
        grads.append(torch.autograd.grad(loss, (images, base, deltas)))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


# --------------------------------------------------------------------------- opcheck / compile
@needs_ext
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck_occlude(device, requires_grad):
    images = torch.randn(2, 3, 7, 5, device=device, requires_grad=requires_grad)
    for base in (torch.tensor(0.5, device=device), torch.randn(2, 3, 7, 5, device=device)):
        base.requires_grad_(requires_grad)
        torch.library.opcheck(torch.ops.cnnviz.occlude.default, (images, [3, 2], [2, 3], base, 1, 4))


@needs_ext
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck_accumulate(device, requires_grad):
    deltas = torch.randn(2, 6, device=device, requires_grad=requires_grad)
    torch.library.opcheck(torch.ops.cnnviz.occlusion_accumulate.default, (deltas, 7, 5, [3, 2], [2, 3]))


def test_compile_fullgraph():
    def f(x, b):
        out = ops.occlude(x, (3, 2), (2, 3), b)
        deltas = out.flatten(2).sum(-1)
        return ops.occlusion_accumulate(deltas, 7, 5, (3, 2), (2, 3))

    x = torch.randn(2, 3, 7, 5, requires_grad=True)
    b = torch.randn(2, 3, 7, 5, requires_grad=True)
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    expected, got = f(x, b), compiled(x, b)
    torch.testing.assert_close(got, expected)
    g1 = torch.autograd.grad(expected.sum(), (x, b))
    g2 = torch.autograd.grad(got.sum(), (x, b))
    for a, e in zip(g2, g1):
        torch.testing.assert_close(a, e)


# --------------------------------------------------------------------------- CPU vs CUDA
@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cpu_matches_cuda(dtype):
    images = torch.randn(2, 3, 17, 13).to(dtype)
    base = torch.randn(2, 3, 17, 13).to(dtype)
    cpu = ops.occlude(images, (4, 3), (3, 5), base, 2, 10)
    gpu = ops.occlude(images.cuda(), (4, 3), (3, 5), base.cuda(), 2, 10)
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=0, atol=0)
    rows, cols = ops.occlusion_grid(17, 13, (4, 3), (3, 5))
    deltas = torch.randn(2, rows * cols).to(dtype)
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(
        ops.occlusion_accumulate(deltas.cuda(), 17, 13, (4, 3), (3, 5)).cpu(),
        ops.occlusion_accumulate(deltas, 17, 13, (4, 3), (3, 5)),
        rtol=rtol,
        atol=atol,
    )


# --------------------------------------------------------------------------- bad arguments
BAD_OCCLUDE = [
    (dict(images=torch.randn(3, 5, 5)), "images"),
    (dict(images=torch.ones(1, 1, 5, 5, dtype=torch.int64)), "images"),
    (dict(window=(0, 2)), "window"),
    (dict(window=(6, 2)), "window"),
    (dict(window=(1, 2, 3)), "window"),
    (dict(stride=(1, -1)), "stride"),
    (dict(first=-1), "first"),
    (dict(count=-2), "count"),
    (dict(first=20, count=10), "first"),
    (dict(baseline=torch.randn(2, 5, 5)), "baseline"),
    (dict(baseline="zero"), "baseline"),
    (dict(baseline=1e300), "baseline"),  # beyond float32: an error, not a silent inf
]


@pytest.mark.parametrize("bad,name", BAD_OCCLUDE)
def test_occlude_bad_arguments(bad, name):
    args = dict(images=torch.randn(1, 3, 5, 5), window=(2, 2), stride=(1, 1), baseline=0.0, first=0, count=4)
    args.update(bad)
    with pytest.raises((ValueError, TypeError, RuntimeError), match=name):
        ops.occlude(**args)


@needs_ext
def test_kernel_checks_name_arguments():
    img = torch.randn(1, 3, 5, 5)
    base = torch.tensor(0.0)
    cases = [
        ((torch.randn(3, 5, 5), [2, 2], [1, 1], base, 0, 1), "images must be a 4-D tensor \\[N, C, H, W\\], got 3-D"),
        ((img, [6, 2], [1, 1], base, 0, 1), "window"),
        ((img, [2, 2], [0, 1], base, 0, 1), "stride"),
        ((img, [2, 2], [1, 1], base, -1, 1), "first"),
        ((img, [2, 2], [1, 1], base, 0, -1), "count"),
        ((img, [2, 2], [1, 1], base, 10, 7), "first \\+ count"),
        ((img, [2, 2], [1, 1], base.double(), 0, 1), "baseline must have the images' dtype"),
        ((img, [2, 2], [1, 1], torch.zeros(3, 5, 5), 0, 1), "baseline must have 1 element"),
    ]
    for args, msg in cases:
        with pytest.raises(RuntimeError, match=msg):
            torch.ops.cnnviz.occlude(*args)
    with pytest.raises(RuntimeError, match="deltas must have P"):
        torch.ops.cnnviz.occlusion_accumulate(torch.randn(1, 5), 5, 5, [2, 2], [1, 1])
    with pytest.raises(RuntimeError, match="deltas must be a 2-D"):
        torch.ops.cnnviz.occlusion_accumulate(torch.randn(16), 5, 5, [2, 2], [1, 1])


def test_accumulate_bad_arguments():
    d = torch.randn(1, 16)
    with pytest.raises(ValueError, match="deltas"):
        ops.occlusion_accumulate(torch.randn(16), 5, 5, 2, 1)
    with pytest.raises(ValueError, match="deltas"):
        ops.occlusion_accumulate(torch.randn(1, 15), 5, 5, 2, 1)
    with pytest.raises(ValueError, match="H"):
        ops.occlusion_accumulate(d, 0, 5, 2, 1)
    with pytest.raises(ValueError, match="window"):
        ops.occlusion_accumulate(d, 5, 5, 6, 1)
    with pytest.raises(ValueError, match="stride"):
        ops.occlusion_accumulate(d, 5, 5, 2, 0)
    with pytest.raises(TypeError, match="deltas"):
        ops.occlusion_accumulate(torch.ones(1, 16, dtype=torch.long), 5, 5, 2, 1)


def test_occlusion_grid():
    assert ops.occlusion_grid(224, 224, 16, 8) == (27, 27)
    assert ops.occlusion_grid(7, 5, (3, 2), (2, 3)) == (3, 2)
    assert ops.occlusion_grid(1, 1, 1, 1) == (1, 1)
    with pytest.raises(ValueError, match="window"):
        ops.occlusion_grid(4, 4, 5, 1)


# --------------------------------------------------------------------------- fallback path
def _run(code, **env):
    full_env = dict(os.environ, **env)
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=full_env)
    assert res.returncode == 0, res.stderr
    return res.stdout


def test_missing_extension_warns_once_and_falls_back():
    out = _run(
        """
        import sys, warnings
        sys.modules["cnnviz_fast._C"] = None  # make `from cnnviz_fast import _C` fail
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            import cnnviz_fast.ops as ops
            import torch
            ops.occlude(torch.randn(1, 1, 4, 4), 2, 2)
            ops.gram(torch.randn(1, 2, 3))
        import importlib
        msgs = [x for x in w if issubclass(x.category, ops.ExtensionMissingWarning)]
        print(len(msgs), ops.has_extension())
        print(msgs[0].message)
        """,
        CNNVIZ_FORCE_REFERENCE="0",
    )
    first, msg = out.split("\n", 1)
    assert first == "1 False"
    assert "pip install --no-build-isolation -e ." in msg and "could not be loaded (ModuleNotFoundError: " in msg


def test_force_reference_env():
    out = _run(
        """
        import warnings
        warnings.simplefilter("error")
        import cnnviz_fast.ops as ops
        print(ops.has_extension())
        """,
        CNNVIZ_FORCE_REFERENCE="1",
    )
    assert out.strip() == "False"
