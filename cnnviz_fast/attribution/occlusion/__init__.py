"""Occlusion sensitivity (Zeiler & Fergus 2014): slide a grey (baseline) window over the
image and record how much the target score drops at each position.

By default the occluded scores come from the incremental engine, which recomputes each
layer only where the window changed it (exact). Full recomputation (``mode="full"``, and
the fallback) builds each occluded batch with one operator call
(:func:`cnnviz_fast.ops.occlude`). The per-position score drops are spread back onto the
pixels once at the end (:func:`cnnviz_fast.ops.occlusion_accumulate`), so no Python work
happens per window position.

- :mod:`.entry`: :func:`occlusion`, its checks and the choice of engine;
- :mod:`.full`: full recomputation, every occluded image through the whole model;
- :mod:`.incremental`: the incremental engine (a traced graph run patch by patch);
- :mod:`.incremental_scorer`: window scores from that engine, its batch size and layout;
- :mod:`.approximate`: approximate mode's knobs and the drill-down over a coarse grid;
- :mod:`.batching`: batch sizes (memory accounting, timing trials) and the clean pass,
  shared with the perturbation family.

``cnnviz_fast.attribution.occlusion`` is the function (the attribution package re-exports
it under the package's name); ``importlib.import_module`` gives this package.
"""
from .batching import choose_batch_size
from .entry import occlusion
from .incremental import IncrementalOcclusion

__all__ = ["occlusion", "choose_batch_size", "IncrementalOcclusion"]
