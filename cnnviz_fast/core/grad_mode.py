"""Gradients on inside a method, whatever grad mode the caller is in."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch


@contextmanager
def autograd_on() -> Iterator[None]:
    """Gradients on for the duration of a method, also when the caller is in
    ``torch.no_grad()`` or ``torch.inference_mode()`` (a service usually is)."""
    with torch.inference_mode(False), torch.enable_grad():
        yield
