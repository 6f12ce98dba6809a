"""cnnviz::gram, cnnviz::gram_loss and cnnviz::_gram_loss_backward."""
import pytest
import torch

import cnnviz_fast.ops as ops
from cnnviz_fast.ops import reference as ref
from op_cases import DTYPES, LAYOUTS, layout, needs_cuda, needs_ext

TOL = {
    torch.float32: (1e-4, 1e-5),
    torch.float64: (1e-10, 1e-12),
    torch.float16: (1e-2, 1e-3),
    torch.bfloat16: (2e-2, 1e-2),
}
# the symmetric product halves C recursively while blocks keep >= 64 channels:
# C=5, 70: one full GEMM; 130, 150: 1 level; 256: 2 levels; 512: 3 levels
SHAPES = [(2, 5, 3, 4), (1, 150, 6, 5), (3, 130, 1, 1), (2, 256, 2, 3), (1, 512, 3, 1)]


def features_(shape, device, dtype, kind):
    return layout(torch.randn(shape, device=device).to(dtype), kind)


def naive_gram(f):
    f = f.double().flatten(2)
    return f @ f.transpose(1, 2) / f.shape[2]


def naive_loss_and_grads(f, t, w):
    """Float64 autograd over bmm + mean squared error (the anchor)."""
    f = f.detach().double().requires_grad_()
    t = t.detach().double().requires_grad_()
    loss = w * ((naive_gram(f) - t) ** 2).mean()
    gf, gt = torch.autograd.grad(loss, (f, t))
    return loss, gf, gt


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES)
def test_gram(device, dtype, kind, shape):
    f = features_(shape, device, dtype, kind)
    g = ops.gram(f)
    assert g.shape == (shape[0], shape[1], shape[1]) and g.dtype == dtype
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(g, ref.gram(f), rtol=rtol, atol=atol)
    torch.testing.assert_close(g.double(), naive_gram(f), rtol=rtol, atol=atol)
    assert torch.equal(g, g.transpose(1, 2))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("target_dims", [2, 3])
def test_gram_loss_and_gradients(device, dtype, kind, shape, target_dims):
    N, C = shape[:2]
    f = features_(shape, device, dtype, kind).requires_grad_()
    t_shape = (N, C, C) if target_dims == 3 else (C, C)
    t = torch.randn(t_shape, device=device).to(dtype).requires_grad_()  # not symmetric
    w = 0.7
    loss = ops.gram_loss(f, t, w)
    assert loss.shape == () and loss.dtype == dtype
    gf, gt = torch.autograd.grad(loss * 3.0, (f, t))
    e_loss, e_gf, e_gt = naive_loss_and_grads(f, t, w)
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(loss.double(), e_loss, rtol=rtol, atol=atol)
    torch.testing.assert_close(gf.double(), 3.0 * e_gf, rtol=rtol, atol=atol)
    torch.testing.assert_close(gt.double(), 3.0 * e_gt, rtol=rtol, atol=atol)
    r_loss = ref.gram_loss(f, t, w)
    torch.testing.assert_close(loss, r_loss, rtol=rtol, atol=atol)


def test_gradcheck(device):
    # C = 128: blocked symmetric product (fast mode keeps it quick)
    f = torch.randn(1, 128, 3, dtype=torch.float64, device=device, requires_grad=True)
    t = torch.randn(128, 128, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: ops.gram_loss(a, b, 1.3), (f, t), fast_mode=True)
    assert torch.autograd.gradcheck(ops.gram, (f,), fast_mode=True)
    f = torch.randn(2, 4, 5, dtype=torch.float64, device=device, requires_grad=True)
    t = torch.randn(2, 4, 4, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: ops.gram_loss(a, b, 0.5), (f, t))
    assert torch.autograd.gradcheck(lambda a, b: ops.gram_loss(a, b, 0.5), (f, t[0].detach().requires_grad_()))
    assert torch.autograd.gradcheck(ops.gram, (f,))


def test_empty_and_tiny(device):
    f = torch.randn(0, 4, 3, 3, device=device, requires_grad=True)
    assert ops.gram(f).shape == (0, 4, 4)
    loss = ops.gram_loss(f, torch.randn(4, 4, device=device), 1.0)
    assert loss.item() == 0.0
    loss.backward()
    assert f.grad.shape == f.shape
    f = torch.randn(2, 1, 1, 1, device=device, requires_grad=True)  # 1 channel, 1x1 images
    torch.testing.assert_close(ops.gram(f), f.detach().reshape(2, 1, 1) ** 2)
    f2 = torch.randn(3, 5, device=device)  # no spatial dims: S = 1
    torch.testing.assert_close(ops.gram(f2), f2[:, :, None] * f2[:, None, :])


def test_layer_lists():
    fs = [torch.randn(2, 8, 4, 4, requires_grad=True), torch.randn(2, 16, 2, 2, requires_grad=True)]
    ts = [ops.gram(torch.randn(2, 8, 4, 4)), ops.gram(torch.randn(1, 16, 2, 2))[0]]
    total = ops.gram_loss(fs, ts, [0.5, 2.0])
    torch.testing.assert_close(total, ops.gram_loss(fs[0], ts[0], 0.5) + ops.gram_loss(fs[1], ts[1], 2.0))
    torch.testing.assert_close(ops.gram_loss(fs, ts, 1.5), ref.gram_loss(fs, ts, 1.5))


@needs_ext
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(device, requires_grad):
    f = torch.randn(2, 70, 3, 2, device=device, requires_grad=requires_grad)
    t = torch.randn(2, 70, 70, device=device, requires_grad=requires_grad)
    torch.library.opcheck(torch.ops.cnnviz.gram.default, (f,))
    torch.library.opcheck(torch.ops.cnnviz.gram_loss.default, (f, t, 0.5))
    torch.library.opcheck(torch.ops.cnnviz.gram_loss.default, (f, t[0], 0.5))
    diff = torch.randn(2, 70, 70, device=device)
    torch.library.opcheck(
        torch.ops.cnnviz._gram_loss_backward.default, (torch.tensor(1.5, device=device), f.detach(), diff, 0.5)
    )


@needs_ext
def test_backward_is_one_matmul_with_the_documented_constant():
    f = torch.randn(2, 6, 5, dtype=torch.float64)
    diff = torch.randn(2, 6, 6, dtype=torch.float64)
    w, g = 0.3, torch.tensor(2.0, dtype=torch.float64)
    got = torch.ops.cnnviz._gram_loss_backward(g, f, diff, w)
    N, C, S = f.shape
    expected = 2.0 * 4 * w / (N * C * C * S) * ((diff + diff.transpose(1, 2)) / 2) @ f
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph(backend):
    conv = torch.nn.Conv2d(3, 8, 3)
    target = torch.randn(8, 8)

    def f(x):
        feats = torch.relu(conv(x))
        return ops.gram_loss(feats, target, 2.0) + ops.gram(feats).sum()

    x = torch.randn(2, 3, 10, 10, requires_grad=True)
    compiled = torch.compile(f, backend=backend, fullgraph=True)
    got, expected = compiled(x), f(x)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(torch.autograd.grad(got, x)[0], torch.autograd.grad(expected, x)[0])


# unit roundoff of a round-to-nearest cast to the 16-bit dtype
UNIT_ROUNDOFF = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("scale", [1.0, 100.0])
def test_16bit_gram_accumulates_in_float32(device, dtype, scale):
    """16-bit features: the product of two half/bf16 values is exact in float32, so with float32
    accumulation the error is at most the accumulation's S * 2^-24 * sum_k |f_ik f_jk| (any
    summation order; doubled for the division by S and slack) plus the final rounding to 16 bits
    (and half's subnormal spacing 2^-24). Accumulating in 16 bits would miss this bound; with
    scale 100 a 16-bit raw product F F^T would overflow half (~2e7 > 65504) though G does not."""
    N, C, S = 2, 96, 2000
    f = (torch.randn(N, C, 40, 50, device=device) * scale).to(dtype)
    f64 = f.double().flatten(2)
    exact = f64 @ f64.transpose(1, 2) / S
    abs_sum = f64.abs() @ f64.abs().transpose(1, 2) / S
    g = ops.gram(f)
    assert g.dtype == dtype
    bound = UNIT_ROUNDOFF[dtype] * exact.abs() + 2 * S * 2.0**-24 * abs_sum + 2.0**-24
    err = (g.double() - exact).abs()
    assert bool((err <= bound).all()), f"max error / bound {(err / bound).max().item():.3g}"


@needs_cuda
@needs_ext
@pytest.mark.skipif(tuple(map(int, torch.__version__.split(".")[:2])) < (2, 8), reason="aten bmm.dtype is in torch >= 2.8")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16bit_gram_on_cuda_makes_no_float32_copy(dtype):
    """The GEMM reads the 16-bit features as they are: the call's extra memory is the float32
    raw product and the output, far below the float32 copy of the features it used to make."""
    f = torch.randn(4, 512, 64, 64, device="cuda", dtype=dtype)
    ops.gram(f)  # first call: cuBLAS workspace and the like
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    g = ops.gram(f)
    extra = torch.cuda.max_memory_allocated() - before
    assert g.dtype == dtype
    float32_copy = f.numel() * 4  # 33.5 MB; raw product + output: 6.3 MB
    assert extra < float32_copy / 2, extra


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cpu_matches_cuda(dtype):
    f = torch.randn(2, 150, 5, 6).to(dtype)
    t = torch.randn(150, 150).to(dtype)
    res = []
    for dev in ("cpu", "cuda"):
        fd, td = f.to(dev).requires_grad_(), t.to(dev).requires_grad_()
        loss = ops.gram_loss(fd, td, 0.5)
        res.append([ops.gram(fd).cpu(), loss.cpu(), *[g.cpu() for g in torch.autograd.grad(loss, (fd, td))]])
    rtol, atol = TOL[dtype]
    for a, b in zip(*res):
        torch.testing.assert_close(a, b, rtol=rtol * 10, atol=atol * 10)


def test_bad_arguments():
    f = torch.randn(2, 4, 3, 3)
    with pytest.raises(ValueError, match="features"):
        ops.gram(torch.randn(4))
    with pytest.raises(ValueError, match="features"):
        ops.gram(torch.randn(2, 4, 0, 3))
    with pytest.raises(TypeError, match="features"):
        ops.gram(torch.ones(2, 4, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="target_gram"):
        ops.gram_loss(f, torch.randn(3, 3))
    with pytest.raises(ValueError, match="target_gram"):
        ops.gram_loss(f, torch.randn(3, 4, 4))
    with pytest.raises(ValueError, match="target_gram"):
        ops.gram_loss([f], [])
    with pytest.raises(ValueError, match="weight"):
        ops.gram_loss([f, f], [torch.randn(4, 4)] * 2, [1.0])


def test_public_rejects_target_dtype_mismatch():
    with pytest.raises(ValueError, match="target_gram must have the features' dtype"):
        ops.gram_loss(torch.randn(2, 4, 3), torch.randn(4, 4, dtype=torch.float64))


@needs_ext
def test_kernel_bad_arguments():
    f = torch.randn(2, 4, 3, 3)
    with pytest.raises(RuntimeError, match="features must be a tensor \\[N, C, \\*spatial\\], got 1-D"):
        torch.ops.cnnviz.gram(torch.randn(4))
    with pytest.raises(RuntimeError, match="target_gram must have shape"):
        torch.ops.cnnviz.gram_loss(f, torch.randn(3, 3), 1.0)
    with pytest.raises(RuntimeError, match="target_gram must have the features' dtype"):
        torch.ops.cnnviz.gram_loss(f, torch.randn(4, 4).double(), 1.0)
    with pytest.raises(RuntimeError, match="diff must have shape"):
        torch.ops.cnnviz._gram_loss_backward(torch.tensor(1.0), f, torch.randn(2, 3, 3), 1.0)
    with pytest.raises(RuntimeError, match="grad_loss must have one element"):
        torch.ops.cnnviz._gram_loss_backward(torch.ones(2), f, torch.randn(2, 4, 4), 1.0)
