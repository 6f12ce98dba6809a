"""Acceptance on the zoo digits model over the whole digits set: last-layer nearest
neighbours share the label, t-SNE separates the classes, PCA equals scikit-learn's."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from cnnviz_fast import embed, extract_features, nearest_neighbors, plot_embedding, zoo

OUTPUT = Path(__file__).resolve().parents[1] / "test-output" / "features"


@pytest.fixture(scope="module")
def digits_features():
    pixels, labels = zoo.digits("all")
    features = extract_features(zoo.digits_cnn(), zoo.DIGITS_NORMALIZE(pixels), "classifier.relu",
                                progress=False)
    assert features.shape == (1797, 128)
    return pixels, labels, features


def test_last_layer_neighbours_share_the_label(digits_features):
    pixels, labels, features = digits_features
    _, indices = nearest_neighbors(features, None, k=5, exclude_self=True)
    agreement = (labels[indices] == labels[:, None]).float().mean().item()
    assert agreement >= 0.95, f"only {agreement:.1%} of top-5 neighbours share the query's label"
    # In pixel space the same neighbours are clearly worse: the network learned something.
    _, pixel_indices = nearest_neighbors(pixels.flatten(1), None, k=5, exclude_self=True)
    assert (labels[pixel_indices] == labels[:, None]).float().mean().item() < agreement


def leave_one_out_knn_accuracy(points, labels, k=5):
    _, indices = nearest_neighbors(points, None, k=k, exclude_self=True)
    votes = torch.nn.functional.one_hot(labels[indices], 10).sum(1)
    return (votes.argmax(1) == labels).float().mean().item()


def test_tsne_separates_the_classes(digits_features):
    pixels, labels, features = digits_features
    # Shortened schedules keep the test fast; both still separate the digits.
    if importlib.util.find_spec("openTSNE") is not None:
        options = dict(n_iter=150, early_exaggeration_iter=100)
    else:
        options = dict(max_iter=400)
    points = embed(features, "tsne", seed=0, n_jobs=1, **options)
    assert points.shape == (1797, 2) and points.dtype == torch.float32
    accuracy = leave_one_out_knn_accuracy(points, labels)
    assert accuracy >= 0.90, f"5-NN accuracy in the t-SNE plane is {accuracy:.1%}"
    plot_embedding(points, labels, path=OUTPUT / "digits_tsne_scatter.png", title="t-SNE of classifier.relu")
    plot_embedding(points, labels, images=pixels, path=OUTPUT / "digits_tsne_thumbnails.png")


def test_pca_equals_scikit_learn(digits_features):
    decomposition = pytest.importorskip("sklearn.decomposition")
    _, _, features = digits_features
    expected = decomposition.PCA(n_components=5).fit_transform(features.double().numpy())
    for solver in ("covariance", "svd"):
        ours = embed(features, "pca", dim=5, solver=solver).double().numpy()
        signs = np.sign((ours * expected).sum(0))  # "up to sign": one sign per component
        np.testing.assert_allclose(ours * signs, expected, rtol=0, atol=2e-4 * np.abs(expected).max())
        assert (signs == 1).all(), f"{solver}: signs should follow scikit-learn's svd_flip"
