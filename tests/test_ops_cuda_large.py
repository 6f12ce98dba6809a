"""The CUDA kernels past the sizes the other op tests use, and foreign-device arguments.

Sizes: more elements than one launch's grid has threads (``blocks_for`` caps the grid at
2^20 blocks of 256 threads, so 2^28+ elements go round the grid-stride loop) and outputs
past 2^31 elements (64-bit indexing). Each needs a few GB to 14 GB of GPU memory.
"""
import pytest
import torch

import cnnviz_fast.ops as ops
from cnnviz_fast.ops import reference as ref
from op_cases import needs_cuda, needs_ext

pytestmark = [needs_cuda, needs_ext]
GRID_THREADS = (1 << 20) * 256


@pytest.fixture(autouse=True)
def free_memory():
    yield
    torch.cuda.empty_cache()  # hand the gigabytes back to the other test processes


def test_guided_relu_backward_past_one_grid():
    n = GRID_THREADS + 12345
    g = torch.Generator("cuda").manual_seed(0)
    out = torch.randn(n, device="cuda", dtype=torch.float16, generator=g).relu_()
    grad = torch.randn(n, device="cuda", dtype=torch.float16, generator=g)
    got = torch.ops.cnnviz._guided_relu_backward(grad, out, "guided", None)
    assert torch.equal(got, ref.guided_relu_backward(grad, out, "guided", None))


def test_occlude_output_past_2_to_the_31_elements():
    x = torch.rand(1, 3, 224, 224, device="cuda", generator=torch.Generator("cuda").manual_seed(0)).half()
    window, stride = (16, 16), (1, 1)  # 209 x 209 = 43,681 positions: 6.6e9 output elements
    out = ops.occlude(x, window, stride, 0.5)
    positions = out.shape[1]
    assert out.numel() > 2**31
    crossing = 2**31 // x[0].numel()  # the position whose copy straddles element 2^31
    for first in (0, crossing - 2, positions - 3):
        expected = ref.occlude(x, window, stride, 0.5, first, 3)
        assert torch.equal(out[:, first:first + 3], expected), first


def test_occlusion_accumulate_many_positions():
    deltas = torch.randn(2, 209 * 209, device="cuda", dtype=torch.float64)
    got = ops.occlusion_accumulate(deltas, 224, 224, (16, 16), (1, 1))
    torch.testing.assert_close(got, ref.occlusion_accumulate(deltas, 224, 224, (16, 16), (1, 1)))


def test_gram_loss_backward_refuses_diff_on_another_device():
    f = torch.randn(2, 4, 3, 3, device="cuda")
    with pytest.raises(RuntimeError, match="diff must be on the features' device"):
        torch.ops.cnnviz._gram_loss_backward(torch.tensor(1.0, device="cuda"), f, torch.randn(2, 4, 4), 1.0)
