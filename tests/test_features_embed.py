"""embed (PCA against NumPy/scikit-learn, t-SNE backends) and plot_embedding pictures."""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cnnviz_fast import embed, plot_embedding

OUTPUT = Path(__file__).resolve().parents[1] / "test-output" / "features"


def blobs(count=300, width=20, centres=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(count) % centres
    means = torch.randn(centres, width, generator=generator) * 6
    points = means[labels] + torch.randn(count, width, generator=generator)
    return points, labels


def numpy_pca(x, dim):
    """Independent reference: NumPy SVD of the centred data, largest entry of each axis positive."""
    centred = x - x.mean(0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    vt = vt[:dim]
    vt *= np.sign(vt[np.arange(dim), np.abs(vt).argmax(1)])[:, None]
    return centred @ vt.T


@pytest.mark.parametrize("solver", ["auto", "covariance", "svd"])
def test_pca_equals_numpy_svd(solver):
    points, _ = blobs()
    ours = embed(points, "pca", dim=3, solver=solver)
    assert ours.shape == (300, 3) and ours.dtype == torch.float32
    np.testing.assert_allclose(ours.numpy(), numpy_pca(points.double().numpy(), 3), atol=1e-3)


def test_pca_lowrank_and_scikit_learn():
    decomposition = pytest.importorskip("sklearn.decomposition")
    points, _ = blobs(400, 30, centres=4)
    expected = decomposition.PCA(2).fit_transform(points.numpy())
    ours = embed(points, "pca", solver="lowrank").numpy()
    np.testing.assert_allclose(ours, expected, atol=1e-2)


def test_pca_streams_a_memory_mapped_collection(tmp_path):
    points, _ = blobs(500, 8)
    np.save(tmp_path / "f.npy", points.numpy())
    mapped = torch.from_numpy(np.load(tmp_path / "f.npy", mmap_mode="c"))
    from cnnviz_fast.features.embedding import pca
    ours = pca(mapped, 2, chunk_size=64)
    np.testing.assert_allclose(ours.numpy(), numpy_pca(points.double().numpy(), 2), atol=1e-3)


@pytest.mark.parametrize("backend", ["opentsne", "sklearn"])
def test_tsne_backends_separate_blobs(backend):
    pytest.importorskip({"opentsne": "openTSNE", "sklearn": "sklearn.manifold"}[backend])
    points, labels = blobs(150, 10, centres=3)
    options = dict(n_iter=100, early_exaggeration_iter=50) if backend == "opentsne" else dict(max_iter=250)
    threadpoolctl = pytest.importorskip("threadpoolctl")  # scikit-learn's OpenMP threads
    with threadpoolctl.threadpool_limits(1):  # oversubscribed threads crawl on a shared CI box
        first = embed(points, "tsne", backend=backend, perplexity=15, seed=1, n_jobs=1, **options)
        again = embed(points, "tsne", backend=backend, perplexity=15, seed=1, n_jobs=1, **options)
    assert first.shape == (150, 2)
    torch.testing.assert_close(first, again, msg="the seed must fix the embedding")
    centres = torch.stack([first[labels == c].mean(0) for c in range(3)])
    nearest = torch.cdist(first, centres).argmin(1)
    assert (nearest == labels).float().mean() > 0.95


def test_missing_tsne_backend_names_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "openTSNE", None)
    with pytest.raises(ImportError, match="openTSNE"):
        embed(torch.randn(50, 3), "tsne", backend="opentsne", perplexity=5)
    pytest.importorskip("sklearn.manifold")
    threadpoolctl = pytest.importorskip("threadpoolctl")
    with threadpoolctl.threadpool_limits(1):  # the default falls back to scikit-learn
        assert embed(torch.randn(50, 3), "tsne", perplexity=5, max_iter=250).shape == (50, 2)


def test_bad_arguments_name_the_argument():
    points = torch.randn(20, 4)
    with pytest.raises(ValueError, match="method"):
        embed(points, "umap")
    with pytest.raises(ValueError, match="dim must be at most"):
        embed(points, "pca", dim=5)
    with pytest.raises(ValueError, match="perplexity"):
        embed(points, "tsne", perplexity=30)
    with pytest.raises(ValueError, match="backend"):
        embed(points, "tsne", backend="umap", perplexity=5)
    with pytest.raises(ValueError, match="solver"):
        embed(points, "pca", solver="magic")
    with pytest.raises(ValueError, match="features must be a 2-D"):
        embed(torch.randn(4), "pca")
    with pytest.raises(ValueError, match="points must be a Tensor"):
        plot_embedding(torch.randn(5, 3))
    with pytest.raises(ValueError, match="labels must be 5"):
        plot_embedding(torch.randn(5, 2), labels=torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="images must be"):
        plot_embedding(torch.randn(5, 2), images=torch.rand(4, 1, 8, 8))


def test_plot_embedding_scatter_and_thumbnails():
    points, labels = blobs(200, 2, centres=4)
    scatter = plot_embedding(points, labels, path=OUTPUT / "blobs_scatter.png", size=400,
                             class_names=["a", "b", "c", "d"])
    assert scatter.size == (400, 400) and (OUTPUT / "blobs_scatter.png").exists()
    pixels = np.asarray(scatter).reshape(-1, 3)
    tab10 = {(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40)}
    found = {tuple(p) for p in np.unique(pixels, axis=0)} & tab10
    assert found == tab10, "each label must be drawn in its colour"

    # Thumbnails: a white square at the top-left point, a black one at the bottom-right.
    corners = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    images = torch.stack([torch.ones(3, 8, 8), torch.zeros(3, 8, 8)])
    picture = np.asarray(plot_embedding(corners, images=images, size=100, thumbnail=20,
                                        path=OUTPUT / "corners_thumbnails.png"))
    assert (picture[:20, :20] == 255).all() and (picture[-20:, -20:] == 0).all()
    assert (picture[40:60, 40:60] == 255).all(), "background must stay white"
