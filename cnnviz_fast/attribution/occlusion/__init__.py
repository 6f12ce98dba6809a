"""Occlusion sensitivity (moved into a package; split below)."""
from .entry import occlusion, choose_batch_size, ACTIVATION_COPIES, MAX_MEASURED_BUDGET, _clean_pass, _time_batch_sizes  # noqa: F401
