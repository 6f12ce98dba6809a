"""Which map can a user trust? Faithfulness metrics for attribution maps.

- :func:`deletion_curve`, :func:`insertion_curve` (RISE): the target probability as the
  top-ranked pixels are removed / revealed, and the area under the curve; the masked
  batches come from :func:`cnnviz_fast.ops.progressive_mask`.
- :func:`infidelity`, :func:`sensitivity_max`: Captum's definitions.
- :func:`model_randomization` (Adebayo et al. sanity checks), :func:`spearman`, :func:`ssim`.
- :func:`pointing_game`.
- :func:`road` (remove and debias, noisy linear imputation; Rong et al. 2022), :func:`irof`
  (iterative removal of superpixels; Rieger & Hansen 2020).
- :func:`evaluate`: several methods over a dataset, a summary table (mean, 95% interval).
- :func:`evaluate_dataset`: the same at dataset scale, streamed through the saliency
  pipeline (maps and per-image curves on disk, resumable); :func:`summarize`, :func:`write_report`.

Every function that runs the model takes ``model, inputs, target`` first, with the targets
of the attribution methods (an int, N ints, ``"predicted"``, a callable, a Neuron).
"""
from .curves import Curve, deletion_curve, insertion_curve, perturbation_curve, step_counts
from .dataset import evaluate_dataset, mean_curves, summarize, write_report
from .evaluate import BETTER, evaluate, format_table
from .irof import Irof, irof
from .pointing import pointing_game
from .road import Road, noisy_linear_imputation, road
from .robustness import infidelity, sensitivity_max, uniform_noise
from .sanity import Randomization, model_randomization, spearman, ssim

__all__ = [
    "BETTER", "Curve", "Randomization", "deletion_curve", "evaluate", "evaluate_dataset", "format_table", "infidelity",
    "insertion_curve", "mean_curves", "model_randomization", "perturbation_curve", "pointing_game",
    "sensitivity_max", "spearman", "ssim", "step_counts", "summarize", "uniform_noise", "write_report",
    "Irof", "Road", "irof", "noisy_linear_imputation", "road",
]
