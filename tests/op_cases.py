"""What every op test file shares: devices, dtypes, memory layouts and skip markers."""
import pytest
import torch

import cnnviz_fast.ops as ops

CUDA = torch.cuda.is_available()
needs_ext = pytest.mark.skipif(not ops.has_extension(), reason="compiled extension not in use")
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs CUDA")

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
LAYOUTS = ["contiguous", "noncontiguous", "channels_last"]


def layout(x: torch.Tensor, kind: str) -> torch.Tensor:
    """``x`` (4-D) with the same shape and values in memory layout ``kind``: contiguous,
    channels_last, or a non-contiguous view (every other element of a wider tensor)."""
    if kind == "contiguous":
        return x
    if kind == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    big = torch.empty(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype, device=x.device)
    big[..., ::2] = x
    out = big[..., ::2]
    assert not out.is_contiguous()
    return out
