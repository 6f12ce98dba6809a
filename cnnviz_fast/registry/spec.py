"""What a method declaration holds: :class:`Method` and its :class:`Option` s.

A declaration is data: the function, its family, whether it needs a layer, its options
(type, default, help) and how its attributions become one map per image. The CLI,
report, pipeline, ``evaluate`` and :class:`~cnnviz_fast.Explainer` read it; nothing
else lists methods.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Tuple

from torch import Tensor

FAMILIES = ("gradient", "cam", "perturbation", "relevance", "control", "synthesis", "feature")
# Families whose function is an attribution: (model, inputs, [layer,] target, ..., return_output=)
ATTRIBUTION_FAMILIES = ("gradient", "cam", "perturbation", "relevance", "control")

# How attributions become one map per image ``[N, H, W]`` (stored by the pipeline, ranked by
# the faithfulness metrics, drawn by the report):
MAP_RULES = {
    "abs_max": "max |·| over channels (gradient magnitude, Simonyan et al.)",
    "sum": "signed sum over channels (additive attributions: IG, Shapley, occlusion deltas)",
    "as_is": "the method already returns one map per image [N, H, W]",
}


def to_map(attributions: Tensor, rule: str = "abs_max") -> Tensor:
    """One map per image ``[N, H, W]`` from ``[N, C, H, W]`` attributions by ``rule``
    (see :data:`MAP_RULES`); ``[N, H, W]`` is returned as is."""
    if rule not in MAP_RULES:
        raise ValueError(f"rule must be one of {', '.join(MAP_RULES)}, got {rule!r}")
    if not isinstance(attributions, Tensor) or attributions.dim() not in (3, 4):
        shape = tuple(attributions.shape) if isinstance(attributions, Tensor) else type(attributions).__name__
        raise ValueError(f"attributions must be a Tensor[N, C, H, W] or [N, H, W], got {shape}")
    if attributions.dim() == 3:
        return attributions
    if rule == "as_is":
        raise ValueError(f"attributions: expected one map per image [N, H, W], got {tuple(attributions.shape)}")
    if rule == "sum":
        return attributions.sum(1)
    return attributions[:, 0].abs() if attributions.shape[1] == 1 else attributions.abs().amax(1)


@dataclass(frozen=True)
class Option:
    """One option of a method, as the CLI offers it (``--samples 16``). ``type`` parses
    a command-line string (int, float, str); ``choices`` limits the values."""

    name: str
    type: Callable[[str], Any]
    default: Any
    help: str
    choices: Optional[Tuple[Any, ...]] = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


@dataclass(frozen=True)
class Method:
    """One declared method.

    ``needs_layer``: the function's third argument is a layer (a dotted name or the module
    itself); when a caller gives none, :func:`cnnviz_fast.registry.default_layer` picks
    one and says which. ``map_rule``: how attributions become one map per image.
    ``report``: shown in the report's attribution strip (slow methods can opt out).
    ``report_options``: options the report and demo use instead of the defaults
    (cheaper settings for a page that shows every method). ``command``: for synthesis and
    feature methods, the ``cnnviz`` subcommand that runs them and ``section`` the report
    section that shows them (None: not in the report)."""

    name: str
    function: Callable
    family: str
    summary: str
    needs_layer: bool = False
    options: Tuple[Option, ...] = ()
    map_rule: str = "abs_max"
    report: bool = True
    report_options: dict = field(default_factory=dict)
    command: Optional[str] = None
    section: Optional[str] = None

    def __post_init__(self):
        if self.is_attribution == bool(self.command):
            raise ValueError(f"{self.name}: attribution methods run through `cnnviz saliency --method`; "
                             f"synthesis and feature methods name their subcommand (command=)")
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}, got {self.family!r}")
        if self.map_rule not in MAP_RULES:
            raise ValueError(f"map_rule must be one of {tuple(MAP_RULES)}, got {self.map_rule!r}")

    @property
    def is_attribution(self) -> bool:
        return self.family in ATTRIBUTION_FAMILIES

    def defaults(self) -> dict:
        return {option.name: option.default for option in self.options}

    def __call__(self, model, inputs: Tensor, target="predicted", layer=None, return_output: bool = False,
                 **options):
        """Run the attribution with the declared calling convention; ``layer`` is used
        only by methods that need one (it must then be given: see
        :func:`~cnnviz_fast.registry.resolve_layer`)."""
        if not self.is_attribution:
            raise ValueError(f"{self.name} is a {self.family} method; run it with `cnnviz {self.command}` "
                             f"or {self.function.__module__}.{self.function.__name__}")
        if self.needs_layer:
            if layer is None:
                raise ValueError(f"{self.name} needs a layer; registry.resolve_layer picks a default one")
            return self.function(model, inputs, layer, target, return_output=return_output, **options)
        if layer is not None:
            raise ValueError(f"layer: {self.name} takes no layer, got {layer!r}")
        return self.function(model, inputs, target, return_output=return_output, **options)

    def maps(self, model, inputs: Tensor, target="predicted", layer=None, **options) -> Tuple[Tensor, Tensor]:
        """``(maps [N, H, W], output)``: one map per image by :attr:`map_rule`, and the
        model output of the same forward pass."""
        attributions, output = self(model, inputs, target, layer, return_output=True, **options)
        return to_map(attributions.detach(), self.map_rule), output


def float_list(text: str):
    return [float(part) for part in text.split(",")]


def int_pair(text: str):
    """``16`` or ``16,8`` → a window / stride (one int, or an (h, w) pair)."""
    parts = [int(part) for part in str(text).split(",")]
    if len(parts) not in (1, 2):
        raise ValueError(f"expected N or H,W, got {text!r}")
    return parts[0] if len(parts) == 1 else tuple(parts)
