"""cnnviz::guided_relu and its private backward cnnviz::_guided_relu_backward."""
import pytest
import torch

import cnnviz_fast.ops as ops
from cnnviz_fast.ops import reference as ref

CUDA = torch.cuda.is_available()
needs_ext = pytest.mark.skipif(not ops.has_extension(), reason="compiled extension not in use")
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs CUDA")

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
MODES = ["guided", "deconvnet", "plain"]
LAYOUTS = ["contiguous", "noncontiguous", "channels_last"]


def layout(x, kind):
    if kind == "contiguous":
        return x
    if kind == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    return x.transpose(1, 3)  # a non-contiguous view


def expected_grad(grad, x, mode):
    """The rules written from the definition (on the input, not the saved output)."""
    if mode == "plain":
        return torch.where(x > 0, grad, torch.zeros_like(grad))
    if mode == "guided":
        return torch.where((x > 0) & (grad > 0), grad, torch.zeros_like(grad))
    return grad.clamp_min(0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", LAYOUTS)
@pytest.mark.parametrize("mode", MODES)
def test_forward_backward(device, dtype, kind, mode):
    x = layout(torch.randn(2, 3, 5, 7, device=device).to(dtype), kind).requires_grad_()
    grad = layout(torch.randn(2, 3, 5, 7, device=device).to(dtype), kind)
    out = ops.guided_relu(x, mode)
    torch.testing.assert_close(out, torch.relu(x), rtol=0, atol=0)
    (gx,) = torch.autograd.grad(out, x, grad)
    torch.testing.assert_close(gx, expected_grad(grad, x.detach(), mode), rtol=0, atol=0)
    x_ref = x.detach().clone().requires_grad_()
    (gr,) = torch.autograd.grad(ref.guided_relu(x_ref, mode), x_ref, grad)
    torch.testing.assert_close(gx, gr, rtol=0, atol=0)


def test_zero_input_gets_no_gradient_and_odd_shapes(device):
    x = torch.tensor([-1.0, 0.0, 2.0], device=device, requires_grad=True)
    (g,) = torch.autograd.grad(ops.guided_relu(x, "plain"), x, torch.ones(3, device=device))
    assert g.tolist() == [0.0, 0.0, 1.0]
    for shape in [(), (1,), (0, 3), (5, 1, 1, 1), (1, 1, 1, 1)]:
        x = torch.randn(shape, device=device, requires_grad=True)
        out = ops.guided_relu(x)
        assert out.shape == x.shape
        if x.numel():
            out.sum().backward()
            torch.testing.assert_close(x.grad, (x > 0).to(x.dtype))


def test_layout_is_kept_for_channels_last():
    x = torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last)
    assert ops.guided_relu(x).is_contiguous(memory_format=torch.channels_last)


def test_saves_only_the_output_so_it_can_follow_in_place_ops():
    # the input is modified in place after the op: a correct backward must not need it
    x = torch.randn(4, 6, requires_grad=True)
    y = x * 1.0
    out = ops.guided_relu(y, "guided")
    y.mul_(-3.0)
    grad = torch.randn(4, 6)
    (gx,) = torch.autograd.grad(out, x, grad)
    torch.testing.assert_close(gx, expected_grad(grad, x.detach(), "guided"))


def test_gradcheck_plain(device):
    x = torch.randn(3, 4, 5, dtype=torch.float64, device=device)
    x = (x + 0.1 * x.sign()).requires_grad_()  # keep away from the kink
    assert torch.autograd.gradcheck(lambda t: ops.guided_relu(t, "plain"), (x,))


@needs_ext
@pytest.mark.parametrize("mode", MODES)
def test_backward_op_matches_reference_formula(device, mode):
    out = torch.relu(torch.randn(64, 33, device=device))
    grad = torch.randn(64, 33, device=device)
    got = torch.ops.cnnviz._guided_relu_backward(grad, out, mode)
    torch.testing.assert_close(got, ref.guided_relu_backward(grad, out, mode), rtol=0, atol=0)


@needs_ext
@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("mode", MODES)
def test_opcheck(device, requires_grad, mode):
    x = torch.randn(2, 3, 4, 5, device=device, requires_grad=requires_grad)
    torch.library.opcheck(torch.ops.cnnviz.guided_relu.default, (x, mode))
    out = torch.relu(torch.randn(2, 3, 4, 5, device=device))
    grad = torch.randn(2, 3, 4, 5, device=device)
    torch.library.opcheck(torch.ops.cnnviz._guided_relu_backward.default, (grad, out, mode))


@needs_ext
def test_opcheck_channels_last():
    x = torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last).requires_grad_()
    torch.library.opcheck(torch.ops.cnnviz.guided_relu.default, (x, "guided"))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph(backend):
    conv = torch.nn.Conv2d(3, 4, 3)

    def f(x):
        return ops.guided_relu(conv(x), "guided").sum(dim=(2, 3))

    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    compiled = torch.compile(f, backend=backend, fullgraph=True)
    got, expected = compiled(x), f(x)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(torch.autograd.grad(got.sum(), x)[0], torch.autograd.grad(expected.sum(), x)[0])


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", MODES)
def test_cpu_matches_cuda(dtype, mode):
    x = torch.randn(3, 5, 7, 9).to(dtype)
    grad = torch.randn(3, 5, 7, 9).to(dtype)
    outs = []
    for dev in ("cpu", "cuda"):
        xd = x.to(dev).requires_grad_()
        out = ops.guided_relu(xd, mode)
        outs.append((out.cpu(), torch.autograd.grad(out, xd, grad.to(dev))[0].cpu()))
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)


@pytest.mark.parametrize("mod", [ops, ref], ids=["public", "reference"])
def test_bad_arguments(mod):
    with pytest.raises(ValueError, match="mode"):
        mod.guided_relu(torch.randn(3), "gided")
    with pytest.raises(TypeError, match="x"):
        mod.guided_relu(torch.ones(3, dtype=torch.long))


@needs_ext
def test_kernel_bad_arguments():
    with pytest.raises(ValueError, match="mode must be one of"):
        torch.ops.cnnviz.guided_relu(torch.randn(3), "bogus")
    with pytest.raises(ValueError, match="mode must be one of"):
        torch.ops.cnnviz._guided_relu_backward(torch.randn(3), torch.randn(3), "bogus")
    with pytest.raises(RuntimeError, match="grad must have the shape of out"):
        torch.ops.cnnviz._guided_relu_backward(torch.randn(4), torch.randn(3), "guided")
    with pytest.raises(RuntimeError, match="grad must have the dtype of out"):
        torch.ops.cnnviz._guided_relu_backward(torch.randn(3).double(), torch.randn(3), "guided")
    with pytest.raises(RuntimeError, match="x must be a floating-point"):
        torch.ops.cnnviz.guided_relu(torch.ones(3, dtype=torch.long), "guided")


@needs_cuda
def test_compile_reduce_overhead_cuda_streams():
    # CUDA graphs replay on a side stream: kernels launched on the wrong stream show up here
    conv = torch.nn.Conv2d(3, 4, 3).cuda()
    target = torch.randn(4, 4, device="cuda")

    def f(x):
        feats = ops.guided_relu(conv(x))
        occluded = ops.occlude(x, 3, 3, 0.0)
        deltas = occluded.flatten(2).sum(-1)
        acc = ops.occlusion_accumulate(deltas, x.shape[2], x.shape[3], 3, 3)
        return ops.gram_loss(feats, target) + acc.sum()

    compiled = torch.compile(f, mode="reduce-overhead", fullgraph=True)
    for _ in range(3):
        x = torch.randn(2, 3, 9, 9, device="cuda")
        torch.testing.assert_close(compiled(x), f(x))
