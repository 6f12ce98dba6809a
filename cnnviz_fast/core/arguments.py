"""Argument names users bring from Captum and pytorch-grad-cam, answered with ours.

``grad_cam(model, x, target_layers=[model.layer4])`` or ``integrated_gradients(...,
n_steps=32)`` raise a ValueError that names the argument to use, instead of Python's bare
``TypeError: unexpected keyword argument``.
"""
from __future__ import annotations

import functools
import inspect
from typing import Callable, Dict

# their name -> ours
FOREIGN_NAMES: Dict[str, str] = {
    "n_steps": "steps", "nt_samples": "samples", "n_samples": "samples", "stdevs": "noise",
    "baselines": "baseline", "sliding_window_shapes": "window", "strides": "stride",
    "target_layers": "layer", "target_layer": "layer", "layer_name": "layer",
    "perturbations_per_eval": "batch_size", "internal_batch_size": "batch_size",
    "nt_samples_batch_size": "batch_size", "targets": "target", "class_idx": "target",
    "input_tensor": "inputs", "attr_output": "target", "input": "inputs", "feature_mask": "segments", "nt_type": "method",
    "reshape_transform": "reshape",
}


def friendly_arguments(function: Callable) -> Callable:
    """Wrap a public method so that an unknown keyword is a ValueError naming ours."""
    parameters = inspect.signature(function).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return function
    known = frozenset(parameters)

    @functools.wraps(function)
    def call(*args, **kwargs):
        if not known.issuperset(kwargs):
            refuse(function.__name__, [name for name in kwargs if name not in known], known)
        return function(*args, **kwargs)

    return call


def refuse(method: str, unknown, known) -> None:
    name = unknown[0]
    ours = FOREIGN_NAMES.get(name)
    if ours is not None and (ours in known or ours == "method"):
        hint = f"cnnviz_fast calls it {ours}=" if ours != "method" else "use the method of that name instead"
        raise ValueError(f"{name}: {method} has no argument {name!r} (Captum / pytorch-grad-cam's name); {hint}")
    public = ", ".join(sorted(k for k in known if k not in ("model", "inputs")))
    raise ValueError(f"{name}: {method} has no argument {name!r}; its arguments: {public}")
