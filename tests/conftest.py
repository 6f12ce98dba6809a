"""Shared pytest fixtures (kept generic: any test module may use them)."""
import pytest
import torch

CUDA_AVAILABLE = torch.cuda.is_available()


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA device")


@pytest.fixture(
    params=["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not CUDA_AVAILABLE, reason="needs CUDA"))]
)
def device(request):
    """Each available device: "cpu", and "cuda" when a GPU is visible."""
    return request.param


@pytest.fixture(autouse=True, scope="session")
def _ieee_float32_on_cuda():
    """Float32 as on the CPU. cuDNN convolutions default to TF32 (10-bit mantissa), which
    moves float32 results by ~1e-3 relative: CPU-vs-GPU and exact-vs-full comparisons would
    then test TF32, not our code."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.fixture(autouse=True)
def _seed():
    """Reproducible random tensors in every test."""
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module's tests (``pytestmark = pytest.mark.usefixtures("one_thread")``):
    the CI machine has 2 shared cores, where small synthesis loops run much faster on one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
