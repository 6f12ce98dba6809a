"""What the features hold: first-layer filters, features of a whole dataset (streamed to
disk), nearest neighbours, PCA / t-SNE embeddings and their pictures, receptive fields
and maximally activating patches."""
from .embedding import embed, plot_embedding
from .extract import extract_features
from .filters import filter_grid
from .neighbors import nearest_neighbors
from .patches import TopActivations, max_activating_patches, patch_grid
from .receptive import ReceptiveField, receptive_field

__all__ = [
    "ReceptiveField", "TopActivations", "embed", "extract_features", "filter_grid",
    "max_activating_patches", "nearest_neighbors", "patch_grid", "plot_embedding",
    "receptive_field",
]
