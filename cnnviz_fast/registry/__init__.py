"""The method registry: every method declared once (:mod:`.declared`), read by the API,
the CLI, the report, the pipeline, ``evaluate`` and :class:`~cnnviz_fast.Explainer`.

    from cnnviz_fast import registry
    method = registry.get_method("grad_cam")
    layer, note = registry.resolve_layer(method, model, inputs)   # a default layer, said why
    maps, output = method.maps(model, inputs, "predicted", layer)  # [N, H, W] by method.map_rule
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

from torch import Tensor, nn

from ..core.layers import layer_name
from .declared import METHODS as _DECLARED
from .layers import DEFAULT_LAYER_RULE, candidate_layers, default_layer
from .spec import ATTRIBUTION_FAMILIES, FAMILIES, MAP_RULES, Method, Option, to_map

__all__ = ["ATTRIBUTION_FAMILIES", "DEFAULT_LAYER_RULE", "FAMILIES", "MAP_RULES", "METHODS", "Method", "Option",
           "attribution_methods", "candidate_layers", "default_layer", "get_method", "method_names",
           "resolve_layer", "to_map"]


def _index(declared) -> Dict[str, Method]:
    methods: Dict[str, Method] = {}
    for method in declared:
        if method.name in methods:
            raise RuntimeError(f"method {method.name!r} is declared twice")
        methods[method.name] = method
    return methods


METHODS: Dict[str, Method] = _index(_DECLARED)


def method_names(family: Optional[str] = None) -> List[str]:
    """Declared method names, in declaration order; of one ``family`` when given."""
    if family is not None and family not in FAMILIES:
        raise ValueError(f"family must be one of {', '.join(FAMILIES)}, got {family!r}")
    return [name for name, method in METHODS.items() if family is None or method.family == family]


def attribution_methods() -> List[str]:
    """The methods that return attributions (API, ``cnnviz saliency``, report, ``evaluate``, Explainer)."""
    return [name for name, method in METHODS.items() if method.is_attribution]


def get_method(name, argument: str = "method") -> Method:
    """The declared method ``name`` (a Method is returned as is); a ValueError naming
    ``argument`` and the choices otherwise."""
    if isinstance(name, Method):
        return name
    method = METHODS.get(name) if isinstance(name, str) else None
    if method is None:
        raise ValueError(f"{argument} must be one of {', '.join(METHODS)}, got {name!r}")
    return method


def resolve_layer(method: Method, model: nn.Module, inputs: Tensor, layer=None,
                  argument: str = "layer") -> Tuple[Optional[str], Optional[str]]:
    """``(layer name, note)`` for ``method`` on ``model``: the given layer (a dotted name
    or the module object; checked), or for a method that needs one and got none the
    layer :data:`DEFAULT_LAYER_RULE` picks, with a note saying so; ``(None, None)`` for
    methods without a layer."""
    if not method.needs_layer:
        if layer is not None:
            raise ValueError(f"{argument}: {method.name} takes no layer, got {layer!r}")
        return None, None
    if layer is not None:
        return layer_name(model, layer, argument), None
    chosen = default_layer(model, inputs)
    if chosen is None:
        raise ValueError(f"{argument}: {method.name} needs a layer with a spatial feature map and "
                         f"{type(model).__name__} has none that the default rule finds; name one")
    return chosen, f"{method.name}: layer {chosen!r} ({DEFAULT_LAYER_RULE}; choose another with layer=)"
