"""nearest_neighbors against a brute-force full sort and scikit-learn; FAISS backend; errors."""
import sys

import numpy as np
import pytest
import torch

from cnnviz_fast import nearest_neighbors


def brute_force(features, queries, k, metric, exclude_self=False):
    """Full distance matrix in float64, stable sort (ties: lowest index first)."""
    f, q = features.double(), queries.double()
    if metric == "l2":
        distances = ((q[:, None, :] - f[None, :, :]) ** 2).sum(2).sqrt()
    else:
        fn = f / f.norm(dim=1, keepdim=True).clamp_min(1e-300)
        qn = q / q.norm(dim=1, keepdim=True).clamp_min(1e-300)
        distances = 1 - qn @ fn.T
    if exclude_self:
        distances.fill_diagonal_(float("inf"))
    order = distances.argsort(dim=1, stable=True)[:, :k]
    return distances.gather(1, order), order


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("chunks", [(16384, 2048), (7, 3)])
def test_equals_brute_force(metric, chunks):
    torch.manual_seed(0)
    features, queries = torch.randn(301, 12), torch.randn(29, 12)
    distances, indices = nearest_neighbors(features, queries, k=6, metric=metric,
                                           chunk_size=chunks[0], query_chunk_size=chunks[1])
    expected_d, expected_i = brute_force(features, queries, 6, metric)
    assert indices.dtype == torch.long and distances.dtype == torch.float32
    assert torch.equal(indices, expected_i)
    torch.testing.assert_close(distances.double(), expected_d, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_exclude_self(metric):
    torch.manual_seed(1)
    features = torch.randn(120, 8)
    features[7] = features[3]  # an exact duplicate must still be found as a neighbour
    distances, indices = nearest_neighbors(features, None, k=4, metric=metric, exclude_self=True,
                                           chunk_size=50, query_chunk_size=16)
    expected_d, expected_i = brute_force(features, features, 4, metric, exclude_self=True)
    assert not (indices == torch.arange(120)[:, None]).any()
    assert indices[3, 0] == 7 and indices[7, 0] == 3
    torch.testing.assert_close(distances.double(), expected_d, rtol=1e-5, atol=1e-5)
    assert torch.equal(indices, expected_i)


def test_matches_scikit_learn_kneighbors():
    neighbors = pytest.importorskip("sklearn.neighbors")
    rng = np.random.default_rng(0)
    features = rng.normal(size=(2000, 64)).astype(np.float32) + 10  # large norms: cancellation
    queries = rng.normal(size=(50, 64)).astype(np.float32) + 10
    expected_d, expected_i = neighbors.NearestNeighbors(n_neighbors=10, algorithm="brute").fit(
        features).kneighbors(queries)
    distances, indices = nearest_neighbors(torch.from_numpy(features), torch.from_numpy(queries), 10)
    np.testing.assert_array_equal(indices.numpy(), expected_i)
    np.testing.assert_allclose(distances.numpy(), expected_d, rtol=1e-5)


def test_float64_stays_float64_and_memmapped_features_work(tmp_path):
    torch.manual_seed(2)
    features = torch.randn(100, 5, dtype=torch.float64)
    np.save(tmp_path / "f.npy", features.numpy())
    mapped = torch.from_numpy(np.load(tmp_path / "f.npy", mmap_mode="c"))
    distances, indices = nearest_neighbors(mapped, features[:10], 3, chunk_size=33)
    expected_d, expected_i = brute_force(features, features[:10], 3, "l2")
    assert distances.dtype == torch.float64
    assert torch.equal(indices, expected_i)
    torch.testing.assert_close(distances, expected_d)


def test_bad_arguments_name_the_argument():
    features = torch.randn(10, 4)
    with pytest.raises(ValueError, match="k must be at most"):
        nearest_neighbors(features, features[:2], k=11)
    with pytest.raises(ValueError, match="k must be at most.*exclude_self"):
        nearest_neighbors(features, None, k=10, exclude_self=True)
    with pytest.raises(ValueError, match="queries must have the features' dimension 4, got 3"):
        nearest_neighbors(features, torch.randn(2, 3), k=1)
    with pytest.raises(ValueError, match="metric"):
        nearest_neighbors(features, features, k=1, metric="manhattan")
    with pytest.raises(ValueError, match="features must be a 2-D"):
        nearest_neighbors(torch.randn(10), None, k=1)
    with pytest.raises(ValueError, match="exclude_self"):
        nearest_neighbors(features, features[:3], k=1, exclude_self=True)
    with pytest.raises(ValueError, match="backend"):
        nearest_neighbors(features, features, k=1, backend="annoy")
    with pytest.raises(ValueError, match="k must be an integer"):
        nearest_neighbors(features, features, k=0)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("exclude_self", [False, True])
def test_faiss_backend_equals_brute_force(metric, exclude_self):
    pytest.importorskip("faiss")
    torch.manual_seed(3)
    features = torch.randn(500, 16)
    queries = features if exclude_self else torch.randn(40, 16)
    distances, indices = nearest_neighbors(features, queries, 5, metric=metric, backend="faiss",
                                           exclude_self=exclude_self, chunk_size=128)
    expected_d, expected_i = brute_force(features, queries, 5, metric, exclude_self)
    assert torch.equal(indices, expected_i)
    torch.testing.assert_close(distances.double(), expected_d, rtol=1e-4, atol=1e-4)


def test_missing_faiss_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # makes `import faiss` fail
    with pytest.raises(ImportError, match=r"cnnviz_fast\[faiss\]"):
        nearest_neighbors(torch.randn(5, 2), None, 1, backend="faiss")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_cuda_matches_cpu(metric):
    torch.manual_seed(4)
    features, queries = torch.randn(5000, 32), torch.randn(100, 32)
    cpu_d, cpu_i = nearest_neighbors(features, queries, 7, metric=metric)
    gpu_d, gpu_i = nearest_neighbors(features, queries.cuda(), 7, metric=metric, chunk_size=1000)
    assert gpu_d.is_cuda and gpu_i.is_cuda
    assert torch.equal(gpu_i.cpu(), cpu_i)
    torch.testing.assert_close(gpu_d.cpu(), cpu_d, rtol=1e-4, atol=1e-4)
