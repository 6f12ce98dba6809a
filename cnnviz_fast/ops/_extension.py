"""Loads the compiled extension ``cnnviz_fast._C`` (which registers ``torch.ops.cnnviz.*``).

If it cannot be loaded, :mod:`cnnviz_fast.ops` warns once with the reason and the fix and
runs the pure-PyTorch reference ops instead. ``CNNVIZ_FORCE_REFERENCE=1`` forces the
reference path even when the extension is present (tests, benchmarks, debugging).
"""
from __future__ import annotations

import os
import warnings

__all__ = ["ExtensionMissingWarning", "LOADED", "LOAD_ERROR", "FORCE_REFERENCE", "USE_EXTENSION"]


class ExtensionMissingWarning(UserWarning):
    """The compiled extension ``cnnviz_fast._C`` could not be loaded; the (slower)
    pure-PyTorch reference ops run instead."""


FORCE_REFERENCE = os.environ.get("CNNVIZ_FORCE_REFERENCE", "").strip().lower() not in ("", "0", "false", "no")

# Every op csrc/cnnviz.cpp declares: an extension built from older sources lacks some, and
# then runs as if it were missing (the fake kernels of absent ops cannot be registered).
OPS = ("occlude", "occlusion_accumulate", "guided_relu", "_guided_relu_backward", "gram", "gram_loss",
       "_gram_loss_backward", "progressive_mask", "rise_mask", "rise_accumulate", "segment_mask")


def _missing_ops():
    import torch

    missing = []
    for name in OPS:
        try:
            torch._C._dispatch_has_kernel_for_dispatch_key(f"cnnviz::{name}", "CPU")
        except RuntimeError:  # "operator cnnviz::<name> does not exist"
            missing.append(name)
    return missing


try:
    from cnnviz_fast import _C  # noqa: F401  (loading it registers torch.ops.cnnviz.*)

    LOAD_ERROR = None
    _MISSING = _missing_ops()
    if _MISSING:
        LOAD_ERROR = f"it was built from older sources (no {', '.join(_MISSING)}); rebuild it"
except ImportError as e:  # also OSError-derived loader failures surface as ImportError
    _C = None
    LOAD_ERROR = f"{type(e).__name__}: {e}"

LOADED = LOAD_ERROR is None
USE_EXTENSION = LOADED and not FORCE_REFERENCE

if not LOADED and not FORCE_REFERENCE:
    warnings.warn(
        "cnnviz_fast: the compiled extension cnnviz_fast._C could not be loaded "
        f"({LOAD_ERROR}); falling back to the slower pure-PyTorch reference ops. "
        "Fix: build it from the repository root with `pip install --no-build-isolation -e .` "
        "(with CUDA kernels: scripts/build_extension.sh), against the torch you run "
        "(the extension must be rebuilt after a torch upgrade). "
        "Set CNNVIZ_FORCE_REFERENCE=1 to use the reference ops without this warning.",
        ExtensionMissingWarning,
        stacklevel=3,
    )
