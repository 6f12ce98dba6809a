"""Exact k-nearest neighbours in feature space, chunked so memory stays bounded."""
from __future__ import annotations

from typing import Optional, Tuple, Union

import numpy as np
import torch

from ..core.validation import check_choice, check_finite, check_positive_int

_METRICS = ("l2", "cosine")
_BACKENDS = ("torch", "faiss")


# rows per step of the finite check (a memory-mapped collection is read in pieces)
_CHECK_ROWS = 65536


def _check_matrix(value, argument: str) -> torch.Tensor:
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(value)
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{argument} must be a Tensor[M, D], got {type(value).__name__}")
    if value.dim() != 2:
        raise ValueError(f"{argument} must be a 2-D tensor [M, D], got shape {tuple(value.shape)}")
    if not value.is_floating_point():
        raise ValueError(f"{argument} must be a floating-point tensor, got {value.dtype}")
    if value.shape[0] == 0:
        raise ValueError(f"{argument} must hold at least one row, got shape {tuple(value.shape)}")
    for start in range(0, value.shape[0], _CHECK_ROWS):  # NaN would give NaN distances silently
        check_finite(value[start:start + _CHECK_ROWS], argument)
    return value


def _merge(best_d, best_i, new_d, new_i, k):
    """Running top-k (smallest) of two candidate sets ``[Q, *]``."""
    d = torch.cat([best_d, new_d], 1)
    i = torch.cat([best_i, new_i], 1)
    d, order = d.topk(k, dim=1, largest=False, sorted=False)
    return d, i.gather(1, order)


def nearest_neighbors(
    features: torch.Tensor, queries: Optional[torch.Tensor], k: int = 5, metric: str = "l2",
    exclude_self: bool = False, backend: str = "torch", chunk_size: int = 16384,
    query_chunk_size: int = 2048, device: Union[str, torch.device, None] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Exact k nearest neighbours of each query among the rows of ``features``.

    Args:
        features: the collection ``Tensor[M, D]`` (may be a memory-mapped tensor from
            :func:`extract_features`; it is read once, ``chunk_size`` rows at a time).
        queries: ``Tensor[Q, D]``, or ``None`` for the collection itself.
        k: neighbours per query (at most M, or M - 1 with ``exclude_self``).
        metric: ``"l2"``: Euclidean distance ``‖q − x‖`` (not squared, as scikit-learn's
            ``kneighbors`` returns); ``"cosine"``: ``1 − cos(q, x)`` (a zero vector has
            cosine similarity 0 to everything).
        exclude_self: queries are the collection (``queries`` is ``None`` or has M rows,
            row i being ``features[i]``): never return index i for query i.
        backend: ``"torch"`` (chunked matrix products, CPU or GPU) or ``"faiss"``
            (``IndexFlatL2``/``IndexFlatIP`` on the CPU; needs ``pip install cnnviz_fast[faiss]``).
        chunk_size: collection rows per step; ``query_chunk_size``: queries per step. Peak
            extra memory is about ``query_chunk_size × chunk_size`` floats.
        device: where to compute (default: the queries' device).

    Ranking uses ``‖q‖² − 2 q·x + ‖x‖²`` (one matrix product per block, float32 for
    float16/32 inputs, ``‖q‖²`` dropped as it does not change the order); the returned
    distances are then recomputed directly from the vectors, so they carry no cancellation
    error (and are never negative). Equal distances come out by index;
    which of several tied rows makes the cut at rank k is unspecified.

    Returns:
        ``(distances Tensor[Q, k], indices Tensor[Q, k] int64)``, nearest first, on the
        queries' device.
    """
    features = _check_matrix(features, "features")
    queries = features if queries is None else _check_matrix(queries, "queries")
    if queries.shape[1] != features.shape[1]:
        raise ValueError(f"queries must have the features' dimension {features.shape[1]}, "
                         f"got {queries.shape[1]}")
    check_choice(metric, _METRICS, "metric")
    check_choice(backend, _BACKENDS, "backend")
    check_positive_int(k, "k")
    check_positive_int(chunk_size, "chunk_size")
    check_positive_int(query_chunk_size, "query_chunk_size")
    available = features.shape[0] - (1 if exclude_self else 0)
    if k > available:
        raise ValueError(f"k must be at most the number of rows of features"
                         f"{' minus 1 (exclude_self)' if exclude_self else ''} ({available}), got {k}")
    if exclude_self and queries.shape[0] != features.shape[0]:
        raise ValueError(f"exclude_self needs queries to be the features ({features.shape[0]} rows), "
                         f"got {queries.shape[0]} queries")
    out_device = queries.device
    if backend == "faiss":
        distances, indices = _faiss_search(features, queries, k, metric, exclude_self, chunk_size)
        return distances.to(out_device), indices.to(out_device)

    device = torch.device(device) if device is not None else queries.device
    dtype = torch.float64 if torch.float64 in (features.dtype, queries.dtype) else torch.float32
    q_all = queries.to(device, dtype)
    if metric == "cosine":
        q_all = torch.nn.functional.normalize(q_all, dim=1)
    n_queries = q_all.shape[0]
    best_d = torch.full((n_queries, k), float("inf"), device=device, dtype=dtype)
    best_i = torch.zeros((n_queries, k), device=device, dtype=torch.long)
    rows = torch.arange(n_queries, device=device)
    for start in range(0, features.shape[0], chunk_size):
        x = features[start:start + chunk_size].to(device, dtype, non_blocking=True)
        if metric == "cosine":
            x = torch.nn.functional.normalize(x, dim=1)
        # Ranking key per query: ‖x‖² − 2 q·x for l2 (‖q‖² is the same for every x, so it is
        # left out), −q̂·x̂ for cosine; one matrix product per block either way.
        bias = torch.linalg.vector_norm(x, dim=1).square_() if metric == "l2" else x.new_zeros(x.shape[0])
        alpha = -2 if metric == "l2" else -1
        take = min(k, x.shape[0])
        for q0 in range(0, n_queries, query_chunk_size):
            q = q_all[q0:q0 + query_chunk_size]
            scores = torch.addmm(bias, q, x.T, alpha=alpha)
            if exclude_self:
                self_col = rows[q0:q0 + len(q)] - start
                inside = (self_col >= 0) & (self_col < x.shape[0])
                scores[inside.nonzero()[:, 0], self_col[inside]] = float("inf")
            d, i = scores.topk(take, dim=1, largest=False, sorted=False)
            best_d[q0:q0 + len(q)], best_i[q0:q0 + len(q)] = _merge(
                best_d[q0:q0 + len(q)], best_i[q0:q0 + len(q)], d, i + start, k)
    best_i = best_i.sort(dim=1).values  # so that equal distances come out by index
    distances = _exact_distances(q_all, features, best_i, metric, dtype)
    distances, order = distances.sort(dim=1, stable=True)
    return distances.to(out_device), best_i.gather(1, order).to(out_device)


def _exact_distances(q, features, indices, metric, dtype):
    """Distances from each query to its chosen neighbours, computed from the difference
    vectors (exact, unlike the expanded form used for ranking)."""
    neighbors = features[indices.flatten().to(features.device)]
    neighbors = neighbors.to(q.device, dtype).view(*indices.shape, -1)
    if metric == "cosine":
        return 1 - (q.unsqueeze(1) * torch.nn.functional.normalize(neighbors, dim=2)).sum(2)
    return (q.unsqueeze(1) - neighbors).norm(dim=2)


def _faiss_search(features, queries, k, metric, exclude_self, chunk_size):
    try:
        import faiss
    except ImportError as error:
        raise ImportError("backend='faiss' needs the faiss package: pip install 'cnnviz_fast[faiss]' "
                          "(or pip install faiss-cpu)") from error

    def prepare(matrix):
        array = np.ascontiguousarray(matrix.detach().cpu().numpy(), dtype=np.float32)
        if metric == "cosine":
            faiss.normalize_L2(array)
        return array

    index = faiss.IndexFlatL2(features.shape[1]) if metric == "l2" else faiss.IndexFlatIP(features.shape[1])
    for start in range(0, features.shape[0], chunk_size):
        index.add(prepare(features[start:start + chunk_size]))
    extra = 1 if exclude_self else 0
    scores, indices = index.search(prepare(queries), k + extra)
    scores, indices = torch.from_numpy(scores), torch.from_numpy(indices).long()
    if exclude_self:  # drop the query itself, or the last hit if ties pushed it out
        own = indices == torch.arange(len(indices)).unsqueeze(1)
        drop = torch.where(own.any(1), own.float().argmax(1), torch.full((len(indices),), k))
        keep = torch.ones_like(own)
        keep[torch.arange(len(indices)), drop] = False
        scores, indices = scores[keep].view(-1, k), indices[keep].view(-1, k)
    if metric == "l2":
        distances = scores.clamp_min(0).sqrt()
    else:
        distances = 1 - scores
    return distances, indices
