"""Saliency over datasets larger than memory: streamed, resumable, one forward per batch,
sharded across torchrun ranks and nodes.

    from cnnviz_fast.pipeline import saliency_maps, open_results
    saliency_maps(model, "/data/images", "out/", method="saliency", normalize=norm, size=224)
    results = open_results("out/")      # len(results), results[i], results.get("a/b.jpg")

``sources`` reads the inputs, ``run`` is the loop, ``writer`` writes the shards in a
background thread, ``results`` holds the index, the merge and the reader, ``distributed``
the torchrun glue, ``cli`` the ``cnnviz saliency`` and ``cnnviz merge`` commands.
"""
from .distributed import init_distributed
from .results import Results, merge, open_results
from .run import METHODS, ExtraColumns, RunSummary, saliency_maps, to_map  # to_map: cnnviz_fast.registry's
from .sources import IMAGE_SUFFIXES, decode_image

__all__ = ["ExtraColumns", "IMAGE_SUFFIXES", "METHODS", "Results", "RunSummary", "decode_image", "init_distributed",
           "merge", "open_results", "saliency_maps", "to_map"]
