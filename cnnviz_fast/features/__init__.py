"""What the features hold: first-layer filters, features of a whole dataset (streamed to
disk), nearest neighbours, PCA / t-SNE embeddings and their pictures, receptive fields
and maximally activating patches; a layer's activations for one image as a grid of tiles."""
from .activations import ActivationGrid, activation_grid
from .embedding import embed, plot_embedding
from .extract import extract_features
from .filters import filter_grid
from .neighbors import nearest_neighbors
from .patches import TopActivations, max_activating_patches, patch_grid
from .receptive import ReceptiveField, receptive_field

__all__ = [
    "ActivationGrid", "ReceptiveField", "TopActivations", "activation_grid", "embed", "extract_features",
    "filter_grid", "max_activating_patches", "nearest_neighbors", "patch_grid", "plot_embedding",
    "receptive_field",
]
