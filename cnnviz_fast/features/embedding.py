"""Low-dimensional embeddings of features (PCA in torch, t-SNE via openTSNE or
scikit-learn) and pictures of them (scatter plots and thumbnail maps)."""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence, Union

import numpy as np
import torch

from ..core.validation import check_choice, check_positive_int
from ..pictures import render_figure
from .neighbors import _check_matrix

if TYPE_CHECKING:
    import PIL.Image

_METHODS = ("pca", "tsne")
_PCA_SOLVERS = ("auto", "covariance", "svd", "lowrank")
# openTSNE (FFT-accelerated gradients) measured faster than scikit-learn's Barnes-Hut
# on 10,000 × 64 here (see benchmarks/results/features-*.md); scikit-learn is the fallback.
_TSNE_BACKENDS = ("opentsne", "sklearn")


def _flip_signs(components: torch.Tensor) -> torch.Tensor:
    """scikit-learn's ``svd_flip(u_based_decision=False)`` convention: the entry of
    largest magnitude of each component (row) is positive."""
    biggest = components.abs().argmax(1)
    signs = torch.sign(components.gather(1, biggest[:, None]))
    signs[signs == 0] = 1
    return components * signs


def _pca_components(features: torch.Tensor, dim: int, solver: str, device, chunk_size: int):
    """Mean ``[D]`` and the top ``dim`` principal axes ``[dim, D]`` (float64 for the
    covariance solver, float32 otherwise)."""
    count, width = features.shape
    if solver == "auto":
        solver = "covariance" if width <= 4096 else "lowrank"
    if solver == "covariance":  # two streamed passes: constant memory over M
        total = torch.zeros(width, dtype=torch.float64, device=device)
        for start in range(0, count, chunk_size):
            total += features[start:start + chunk_size].to(device, torch.float64).sum(0)
        mean = total / count
        covariance = torch.zeros(width, width, dtype=torch.float64, device=device)
        for start in range(0, count, chunk_size):
            centred = features[start:start + chunk_size].to(device, torch.float64) - mean
            covariance.addmm_(centred.T, centred)
        _, vectors = torch.linalg.eigh(covariance)  # ascending eigenvalues
        components = vectors[:, -dim:].flip(1).T
    else:
        x = features.to(device, torch.float32)
        mean = x.mean(0)
        if solver == "svd":
            _, _, vt = torch.linalg.svd(x - mean, full_matrices=False)
            components = vt[:dim]
        else:
            _, _, v = torch.pca_lowrank(x, q=min(dim + 10, *x.shape), center=True, niter=6)
            components = v[:, :dim].T
    return mean, _flip_signs(components)


def pca(features: torch.Tensor, dim: int = 2, solver: str = "auto",
        device: Union[str, torch.device, None] = None, chunk_size: int = 65536) -> torch.Tensor:
    """Principal-component projection ``Tensor[M, dim]`` (see :func:`embed`)."""
    features = _check_matrix(features, "features")
    check_positive_int(dim, "dim")
    if dim > min(features.shape):
        raise ValueError(f"dim must be at most min(M, D) = {min(features.shape)} for PCA, got {dim}")
    check_choice(solver, _PCA_SOLVERS, "solver")
    device = torch.device(device) if device is not None else features.device
    mean, components = _pca_components(features, dim, solver, device, chunk_size)
    out = torch.empty(features.shape[0], dim, dtype=torch.float32, device=device)
    for start in range(0, features.shape[0], chunk_size):
        chunk = features[start:start + chunk_size].to(device, components.dtype) - mean
        out[start:start + chunk_size] = chunk @ components.T
    return out.to(features.device)


def _installed(module: str) -> bool:
    try:
        importlib.import_module(module)
        return True
    except ImportError:
        return False


def _tsne(points: np.ndarray, dim: int, backend: Optional[str], seed: int, perplexity: float,
          n_jobs: Optional[int], **kwargs) -> np.ndarray:
    if backend is None:
        backend = "opentsne" if _installed("openTSNE") else "sklearn"
    if backend == "opentsne":
        try:
            import openTSNE
        except ImportError as error:
            raise ImportError("backend='opentsne' needs openTSNE: pip install 'cnnviz_fast[features]' "
                              "(or pip install openTSNE)") from error
        options = dict(n_components=dim, perplexity=perplexity, random_state=seed,
                       n_jobs=torch.get_num_threads() if n_jobs is None else n_jobs, verbose=False)
        if dim > 2:  # openTSNE's FFT gradients exist for 1-D and 2-D embeddings only
            options["negative_gradient_method"] = "bh"
        options.update(kwargs)
        return np.asarray(openTSNE.TSNE(**options).fit(points))
    try:
        from sklearn.manifold import TSNE
    except ImportError as error:
        raise ImportError("backend='sklearn' needs scikit-learn: pip install 'cnnviz_fast[features]'") from error
    options = dict(n_components=dim, perplexity=perplexity, random_state=seed, n_jobs=n_jobs,
                   init="pca", method="barnes_hut" if dim < 4 else "exact")
    options.update(kwargs)
    return TSNE(**options).fit_transform(points)


def embed(features: torch.Tensor, method: str = "pca", dim: int = 2, *, backend: Optional[str] = None,
          seed: int = 0, perplexity: float = 30.0, pca_dims: Optional[int] = 50,
          solver: str = "auto", n_jobs: Optional[int] = None,
          device: Union[str, torch.device, None] = None, **tsne_kwargs) -> torch.Tensor:
    """Embed ``features`` ``Tensor[M, D]`` in ``dim`` dimensions: ``Tensor[M, dim]`` float32
    on the features' device.

    ``method="pca"``: projection on the top principal axes, computed in torch on ``device``
    (default: the features' device). ``solver="covariance"`` (the default for D ≤ 4096)
    accumulates the D×D covariance in float64 over chunks of rows, so a memory-mapped
    collection larger than RAM costs constant memory, and is exact; ``"svd"`` is an exact
    SVD of the centred matrix in memory; ``"lowrank"`` (default for D > 4096) is
    ``torch.pca_lowrank`` (randomised). Signs follow scikit-learn (the largest-magnitude
    entry of each principal axis is positive), so the result equals
    ``sklearn.decomposition.PCA(dim).fit_transform`` up to floating-point error.

    ``method="tsne"``: t-SNE on the CPU with ``backend="opentsne"`` (the default when
    openTSNE is installed: faster) or ``"sklearn"``; ``seed`` fixes the result,
    ``perplexity`` and ``**tsne_kwargs`` go to the backend's ``TSNE``. Features wider than
    ``pca_dims`` are first reduced to ``pca_dims`` principal components (the usual
    practice; ``pca_dims=None`` to skip). ``n_jobs``: threads (default: ``torch.get_num_threads()``
    for openTSNE, scikit-learn's own default otherwise; on a machine shared with other
    jobs, ``n_jobs=1`` can be several times faster than oversubscribed threads).
    """
    features = _check_matrix(features, "features")
    check_choice(method, _METHODS, "method")
    check_positive_int(dim, "dim")
    if method == "pca":
        return pca(features, dim, solver, device)
    if backend is not None and backend not in _TSNE_BACKENDS:
        raise ValueError(f"backend must be one of {_TSNE_BACKENDS} (or None), got {backend!r}")
    count = features.shape[0]
    if not 0 < perplexity < count:
        raise ValueError(f"perplexity must lie in (0, M = {count}), got {perplexity}")
    if pca_dims is not None:
        check_positive_int(pca_dims, "pca_dims")
    reduced = features
    if pca_dims is not None and features.shape[1] > pca_dims and count > pca_dims:
        reduced = pca(features, pca_dims, solver, device)
    points = np.ascontiguousarray(reduced.detach().cpu().numpy(), dtype=np.float64)
    result = _tsne(points, dim, backend, seed, perplexity, n_jobs, **tsne_kwargs)
    return torch.from_numpy(np.ascontiguousarray(result, dtype=np.float32)).to(features.device)


# matplotlib's "tab10" colours, for label borders drawn with PIL.
_TAB10 = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
          (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def _label_colour(label: int, classes: int):
    if classes <= len(_TAB10):
        return _TAB10[label % len(_TAB10)]
    import colorsys
    r, g, b = colorsys.hsv_to_rgb((label % classes) / classes, 0.8, 0.9)
    return int(r * 255), int(g * 255), int(b * 255)


def _thumbnail_map(points: np.ndarray, labels, images: torch.Tensor, size: int, thumbnail: int):
    from PIL import Image

    from ..pictures import scale_to_unit

    canvas = Image.new("RGB", (size, size), (255, 255, 255))
    low, high = points.min(0), points.max(0)
    span = np.where(high > low, high - low, 1.0)
    border = 2 if labels is not None else 0
    room = size - thumbnail - 2 * border
    corners = ((points - low) / span * room).round().astype(int)
    corners[:, 1] = room - corners[:, 1]  # y grows upwards, as in a scatter plot
    pixels = images.detach().float().cpu()
    if pixels.numel() and (pixels.min() < 0 or pixels.max() > 1):
        pixels = scale_to_unit(pixels)
    pixels = (pixels.clamp(0, 1) * 255).round().byte()
    if pixels.shape[1] == 1:
        pixels = pixels.expand(-1, 3, -1, -1)
    pixels = pixels.permute(0, 2, 3, 1).numpy()
    classes = int(labels.max()) + 1 if labels is not None else 0
    for index, (left, top) in enumerate(corners):
        tile = Image.fromarray(np.ascontiguousarray(pixels[index])).resize((thumbnail, thumbnail), Image.BILINEAR)
        if labels is not None:
            frame = Image.new("RGB", (thumbnail + 2 * border,) * 2, _label_colour(int(labels[index]), classes))
            frame.paste(tile, (border, border))
            tile = frame
        canvas.paste(tile, (int(left), int(top)))
    return canvas


def _scatter(points: np.ndarray, labels, size: int, class_names, title, point_size):
    def draw(figure):
        axes = figure.add_subplot(1, 1, 1)
        if labels is None:
            axes.scatter(points[:, 0], points[:, 1], s=point_size, color=np.array(_TAB10[0]) / 255, linewidths=0)
        else:
            classes = int(labels.max()) + 1
            for label in np.unique(labels):
                chosen = labels == label
                name = class_names[label] if class_names is not None else str(label)
                axes.scatter(points[chosen, 0], points[chosen, 1], s=point_size, linewidths=0,
                             color=np.array(_label_colour(int(label), classes)) / 255, label=name)
            axes.legend(markerscale=max(1.0, 30 / point_size) ** 0.5, fontsize="small", loc="best",
                        framealpha=0.8)
        axes.set_xticks([])
        axes.set_yticks([])
        if title:
            axes.set_title(title)

    return render_figure(draw, (size / 100, size / 100))


def plot_embedding(points: torch.Tensor, labels: Optional[torch.Tensor] = None,
                   images: Optional[torch.Tensor] = None, path: Union[str, Path, None] = None,
                   size: int = 1000, thumbnail: int = 32, class_names: Optional[Sequence[str]] = None,
                   title: Optional[str] = None, point_size: float = 8.0) -> "PIL.Image.Image":
    """Picture of a 2-D embedding, saved as PNG when ``path`` is given; returns the
    ``PIL.Image`` (``size`` × ``size`` pixels).

    Without ``images``: a scatter plot (matplotlib, drawn off-screen with Agg), one colour
    per label of ``labels`` ``Tensor[M]`` (ints in [0, classes)) with a legend
    (``class_names[label]``). With ``images`` ``Tensor[M, C, H, W]`` (C = 1 or 3; values in
    [0, 1], else min-max scaled): the classic thumbnail map, each image drawn at its
    position, ``thumbnail`` pixels wide, framed in its label's colour when ``labels`` is
    given (later images are drawn on top).
    """
    points = _check_matrix(points, "points")
    if points.shape[1] != 2:
        raise ValueError(f"points must be a Tensor[M, 2] (a 2-D embedding), got shape {tuple(points.shape)}")
    count = points.shape[0]
    array = points.detach().cpu().double().numpy()
    if not np.isfinite(array).all():
        raise ValueError("points contains NaN or infinite values")
    check_positive_int(size, "size", minimum=64)
    label_array = None
    if labels is not None:
        label_array = torch.as_tensor(labels).detach().cpu().numpy()
        if label_array.shape != (count,) or not np.issubdtype(label_array.dtype, np.integer) \
                or (label_array < 0).any():
            raise ValueError(f"labels must be {count} non-negative ints (one per point), "
                             f"got {label_array.dtype} of shape {label_array.shape}")
        if class_names is not None and len(class_names) <= label_array.max():
            raise ValueError(f"class_names must name every label (max {label_array.max()}), "
                             f"got {len(class_names)} names")
    if images is not None:
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[0] != count \
                or images.shape[1] not in (1, 3):
            raise ValueError(f"images must be a Tensor[{count}, C, H, W] with C in (1, 3), got "
                             f"{tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}")
        check_positive_int(thumbnail, "thumbnail", minimum=4)
        if thumbnail >= size:
            raise ValueError(f"thumbnail must be smaller than size ({size}), got {thumbnail}")
        picture = _thumbnail_map(array, label_array, images, size, thumbnail)
    else:
        picture = _scatter(array, label_array, size, class_names, title, point_size)
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        picture.save(path, format="PNG")
    return picture
