"""Checks whose device read waits until the end of the call.

Reading a GPU value on the host (``bool(t)``, ``t.item()``, ``t.tolist()``) waits for every
kernel queued before it. A check of the inputs (finite?) or of a GPU target (classes in
range?) at the start of a call therefore made the host wait for the previous call's work
before it could queue this call's forward pass: the GPU ran dry between calls.

Within :func:`deferred_checks` such a check queues its verdict instead: a one-element flag
computed on the device, copied into pinned host memory without blocking, and a CUDA event
recorded right after that copy (so before the call's forward pass). When the block ends
the verdict is read: by then the host has queued the whole call, the flag was computed
long before the forward pass finished, and the event has usually completed already
(``event.query()``, no wait); if not, the host waits for that event only, never for the
call's own work. A failed check raises its ``ValueError`` there, as it would have at the
start; the call's results are discarded. Outside such a block (and for CPU tensors) the
checks read at once, as before.

Under ``torch.cuda.set_sync_debug_mode("error")`` a call in such a block runs without a
synchronizing operation (tests/test_gpu_paths.py).
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional

import torch

__all__ = ["deferred_checks", "defers", "defer_check"]

# Device types whose reads are deferred. Tests add "cpu" to run the deferred path here.
DEFERRED_DEVICES = {"cuda"}

_LOCAL = threading.local()


@dataclass
class _Pending:
    flag: torch.Tensor                    # bool, one element: True = the check failed
    event: Optional[torch.cuda.Event]     # recorded after the copy of ``flag`` to the host
    confirm: Optional[Callable[[], bool]]  # exact re-check when the flag says failed (error path)
    message: Callable[[], str]

    def failed(self) -> bool:
        if self.event is not None and not self.event.query():
            self.event.synchronize()  # waits for the flag's copy, queued before the forward pass
        return bool(self.flag) and (self.confirm is None or self.confirm())


def _stack() -> List[List[_Pending]]:
    stack = getattr(_LOCAL, "stack", None)
    if stack is None:
        stack = _LOCAL.stack = []
    return stack


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def defers(tensor: torch.Tensor) -> bool:
    """Whether a check of ``tensor`` is deferred here: a :func:`deferred_checks` block is
    open in this thread and the tensor lives on a device whose reads wait (a GPU)."""
    return bool(getattr(_LOCAL, "stack", None)) and tensor.device.type in DEFERRED_DEVICES


def defer_check(failed: Callable[[], torch.Tensor], message: Callable[[], str],
                confirm: Optional[Callable[[], bool]] = None) -> None:
    """Queue a check: ``failed()`` computes a one-element bool tensor on the device, True
    when the check failed; ``message()`` makes the ``ValueError``'s text and ``confirm()`` an
    exact re-check, both only when it failed. Call only where :func:`defers` is True.
    During CUDA-graph capture nothing is computed or queued: a captured call's caller checks
    its inputs before each replay (:class:`~cnnviz_fast.Explainer` with ``cuda_graph=True``)."""
    if _capturing():
        return
    failed = failed()
    event = None
    if failed.device.type == "cuda":
        failed = failed.reshape(1).to("cpu", non_blocking=True)  # into pinned memory: no wait
        event = torch.cuda.Event()
        event.record()
    _stack()[-1].append(_Pending(failed, event, confirm, message))


def _raise_failed(pending: List[_Pending], cause: Optional[BaseException] = None) -> None:
    for check in pending:
        if check.failed():
            raise ValueError(check.message()) from cause


@contextmanager
def deferred_checks() -> Iterator[None]:
    """Within the block, checks of GPU tensors queue their verdicts (see the module
    docstring); at its end the first failed one raises its ``ValueError``. An exception
    raised inside the block (a NaN input can make a model fail in its own way) is replaced
    by the failed check's ValueError when there is one."""
    pending: List[_Pending] = []
    stack = _stack()
    stack.append(pending)
    try:
        yield
    except Exception as error:
        _raise_failed(pending, cause=error)
        raise
    else:
        _raise_failed(pending)
    finally:
        stack.pop()
