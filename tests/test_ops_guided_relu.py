"""cnnviz::guided_relu and its private backward cnnviz::_guided_relu_backward."""
import pytest
import torch

import cnnviz_fast.ops as ops
from cnnviz_fast.ops import reference as ref
from op_cases import DTYPES, LAYOUTS, layout, needs_cuda, needs_ext

MODES = ["guided", "deconvnet", "plain"]


UPPERS = [None, 0.75]  # ReLU and a bounded ReLU (0.75 is exact in every dtype)


def expected_grad(grad, x, mode, upper=None):
    """The rules written from the definition (on the input, not the saved output):
    linear range 0 < x < upper; deconvnet keeps only the upper side."""
    below = torch.ones_like(x, dtype=torch.bool) if upper is None else x < upper
    if mode == "plain":
        return torch.where((x > 0) & below, grad, torch.zeros_like(grad))
    if mode == "guided":
        return torch.where((x > 0) & below & (grad > 0), grad, torch.zeros_like(grad))
    return torch.where(below, grad.clamp_min(0), torch.zeros_like(grad))


def expected_out(x, upper):
    return torch.relu(x) if upper is None else torch.clamp(x, 0, upper)


@pytest.mark.parametrize("upper", UPPERS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", LAYOUTS)
@pytest.mark.parametrize("mode", MODES)
def test_forward_backward(device, dtype, kind, mode, upper):
    x = layout(torch.randn(2, 3, 5, 7, device=device).to(dtype), kind).requires_grad_()
    grad = layout(torch.randn(2, 3, 5, 7, device=device).to(dtype), kind)
    out = ops.guided_relu(x, mode, upper)
    torch.testing.assert_close(out, expected_out(x, upper), rtol=0, atol=0)
    (gx,) = torch.autograd.grad(out, x, grad)
    torch.testing.assert_close(gx, expected_grad(grad, x.detach(), mode, upper), rtol=0, atol=0)
    x_ref = x.detach().clone().requires_grad_()
    (gr,) = torch.autograd.grad(ref.guided_relu(x_ref, mode, upper), x_ref, grad)
    torch.testing.assert_close(gx, gr, rtol=0, atol=0)


@pytest.mark.parametrize("mod", [ops, ref], ids=["public", "reference"])
def test_bounds_are_saturated_exactly_at_zero_and_upper(device, mod):
    # x == 0 and x == upper pass nothing in every mode; deconvnet passes x < 0 (grad > 0)
    x = torch.tensor([-1.0, 0.0, 0.5, 0.75, 1.0], device=device, requires_grad=True)
    ones = torch.ones(5, device=device)
    rows = {
        "plain": [0.0, 0.0, 1.0, 0.0, 0.0],
        "guided": [0.0, 0.0, 1.0, 0.0, 0.0],
        "deconvnet": [1.0, 1.0, 1.0, 0.0, 0.0],
    }
    for mode, expected in rows.items():
        out = mod.guided_relu(x, mode, 0.75)
        assert out.tolist() == [0.0, 0.0, 0.5, 0.75, 0.75]
        assert torch.autograd.grad(out, x, ones)[0].tolist() == expected
    # negative incoming gradient: nothing passes in guided / deconvnet
    for mode in ("guided", "deconvnet"):
        assert torch.autograd.grad(mod.guided_relu(x, mode, 0.75), x, -ones)[0].tolist() == [0.0] * 5


@pytest.mark.parametrize("dtype", DTYPES)
def test_plain_mode_is_torch_relu6_and_hardtanh_gradient(device, dtype):
    # an independent oracle: torch's own relu6 / hardtanh(0, t) backward, also at x == t
    x = torch.cat([torch.randn(200, device=device) * 4, torch.tensor([0.0, 6.0, 0.75, -0.0], device=device)])
    x = x.to(dtype).requires_grad_()
    grad = torch.randn(x.shape, device=device).to(dtype)
    hardtanh = lambda t: torch.nn.functional.hardtanh(t, 0.0, 0.75)  # noqa: E731
    for upper, torch_fn in [(6.0, torch.nn.functional.relu6), (0.75, hardtanh)]:
        out = ops.guided_relu(x, "plain", upper)
        expected = torch_fn(x)
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
        torch.testing.assert_close(
            torch.autograd.grad(out, x, grad)[0], torch.autograd.grad(expected, x, grad)[0], rtol=0, atol=0
        )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", MODES)
def test_upper_is_rounded_to_the_dtype(device, dtype, mode):
    # 6.09 is not representable in half / bf16: forward and backward use its rounded
    # value, like torch.clamp, and kernel == reference bit for bit
    x = (torch.rand(4000, device=device) * 12 - 3).to(dtype)
    x = torch.cat([x, torch.tensor([6.09], device=device).to(dtype)]).requires_grad_()
    grad = torch.randn(x.shape, device=device).to(dtype)
    out = ops.guided_relu(x, mode, 6.09)
    torch.testing.assert_close(out, torch.clamp(x, 0, 6.09), rtol=0, atol=0)
    assert out.max().item() == torch.tensor(6.09, dtype=dtype).item()
    x_ref = x.detach().clone().requires_grad_()
    torch.testing.assert_close(
        torch.autograd.grad(out, x, grad)[0],
        torch.autograd.grad(ref.guided_relu(x_ref, mode, 6.09), x_ref, grad)[0],
        rtol=0, atol=0,
    )


def test_infinite_upper_is_plain_relu(device):
    x = torch.tensor([-1.0, 0.0, 2.0, float("inf")], device=device, requires_grad=True)
    for mode in MODES:
        a = ops.guided_relu(x, mode, float("inf"))
        b = ops.guided_relu(x, mode)
        assert a.tolist() == b.tolist()
        ones = torch.ones(4, device=device)
        assert torch.autograd.grad(a, x, ones)[0].tolist() == torch.autograd.grad(b, x, ones)[0].tolist()


@pytest.mark.parametrize("upper", UPPERS)
def test_zero_input_gets_no_gradient_and_odd_shapes(device, upper):
    x = torch.tensor([-1.0, 0.0, 0.5], device=device, requires_grad=True)
    (g,) = torch.autograd.grad(ops.guided_relu(x, "plain", upper), x, torch.ones(3, device=device))
    assert g.tolist() == [0.0, 0.0, 1.0]
    for shape in [(), (1,), (0, 3), (5, 1, 1, 1), (1, 1, 1, 1), (3, 1, 17, 1)]:
        x = torch.randn(shape, device=device, requires_grad=True)
        out = ops.guided_relu(x, "guided", upper)
        assert out.shape == x.shape
        if x.numel():
            out.sum().backward()
            torch.testing.assert_close(x.grad, expected_grad(torch.ones_like(x), x.detach(), "plain", upper))


def test_layout_is_kept_for_channels_last():
    x = torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last)
    assert ops.guided_relu(x).is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("upper", UPPERS)
def test_saves_only_the_output_so_it_can_follow_in_place_ops(upper):
    # the input is modified in place after the op: a correct backward must not need it
    x = torch.randn(4, 6, requires_grad=True)
    y = x * 1.0
    out = ops.guided_relu(y, "guided", upper)
    y.mul_(-3.0)
    grad = torch.randn(4, 6)
    (gx,) = torch.autograd.grad(out, x, grad)
    torch.testing.assert_close(gx, expected_grad(grad, x.detach(), "guided", upper))


@pytest.mark.parametrize("upper", UPPERS)
def test_gradcheck_plain(device, upper):
    x = torch.randn(3, 4, 5, dtype=torch.float64, device=device)
    x = (x + 0.1 * x.sign()).requires_grad_()  # keep away from the kink at 0
    if upper is not None:
        x = torch.where((x - upper).abs() < 0.1, x + 0.2, x).detach().requires_grad_()  # and at upper
    assert torch.autograd.gradcheck(lambda t: ops.guided_relu(t, "plain", upper), (x,))


@needs_ext
@pytest.mark.parametrize("upper", UPPERS)
@pytest.mark.parametrize("mode", MODES)
def test_backward_op_matches_reference_formula(device, mode, upper):
    out = expected_out(torch.randn(64, 33, device=device), upper)
    grad = torch.randn(64, 33, device=device)
    got = torch.ops.cnnviz._guided_relu_backward(grad, out, mode, upper)
    torch.testing.assert_close(got, ref.guided_relu_backward(grad, out, mode, upper), rtol=0, atol=0)


@needs_ext
@pytest.mark.parametrize("upper", UPPERS)
@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("mode", MODES)
def test_opcheck(device, requires_grad, mode, upper):
    x = torch.randn(2, 3, 4, 5, device=device, requires_grad=requires_grad)
    torch.library.opcheck(torch.ops.cnnviz.guided_relu.default, (x, mode, upper))
    out = expected_out(torch.randn(2, 3, 4, 5, device=device), upper)
    grad = torch.randn(2, 3, 4, 5, device=device)
    torch.library.opcheck(torch.ops.cnnviz._guided_relu_backward.default, (grad, out, mode, upper))


@needs_ext
def test_opcheck_channels_last():
    x = torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last).requires_grad_()
    torch.library.opcheck(torch.ops.cnnviz.guided_relu.default, (x, "guided"))
    torch.library.opcheck(torch.ops.cnnviz.guided_relu.default, (x, "deconvnet", 6.0))


@pytest.mark.parametrize("upper", UPPERS)
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph(backend, upper):
    conv = torch.nn.Conv2d(3, 4, 3)

    def f(x):
        return ops.guided_relu(conv(x), "guided", upper).sum(dim=(2, 3))

    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    compiled = torch.compile(f, backend=backend, fullgraph=True)
    got, expected = compiled(x), f(x)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(torch.autograd.grad(got.sum(), x)[0], torch.autograd.grad(expected.sum(), x)[0])


@needs_cuda
@pytest.mark.parametrize("upper", UPPERS + [6.09])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", MODES)
def test_cpu_matches_cuda(dtype, mode, upper):
    x = torch.randn(3, 5, 7, 9).to(dtype) * 4
    grad = torch.randn(3, 5, 7, 9).to(dtype)
    outs = []
    for dev in ("cpu", "cuda"):
        xd = x.to(dev).requires_grad_()
        out = ops.guided_relu(xd, mode, upper)
        outs.append((out.cpu(), torch.autograd.grad(out, xd, grad.to(dev))[0].cpu()))
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)


def test_bad_arguments():
    with pytest.raises(ValueError, match="mode"):
        ops.guided_relu(torch.randn(3), "gided")
    with pytest.raises(TypeError, match="x"):
        ops.guided_relu(torch.ones(3, dtype=torch.long))
    for bad in (0, -1.0, float("nan"), float("-inf")):
        with pytest.raises(ValueError, match="upper"):
            ops.guided_relu(torch.randn(3), "guided", bad)
    for bad in ("6", True, torch.tensor(6.0)):
        with pytest.raises(TypeError, match="upper"):
            ops.guided_relu(torch.randn(3), "guided", bad)


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
    with pytest.raises(ValueError, match="upper must be None or a number > 0"):
        torch.ops.cnnviz.guided_relu(torch.randn(3), "guided", 0.0)
    with pytest.raises(ValueError, match="upper must be None or a number > 0"):
        torch.ops.cnnviz._guided_relu_backward(torch.randn(3), torch.randn(3), "guided", -1.0)


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
