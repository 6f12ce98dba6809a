"""Every method of the package, declared once. Consumers (API, CLI, report, pipeline,
``evaluate``, :class:`~cnnviz_fast.Explainer`, the service) read :data:`METHODS`.

Adding a method: write the function (``model, inputs, [layer,] target, ...,
return_output=False``), declare it below in its family's block, add its tests;
``tests/test_registry.py`` walks every consumer.
"""
from __future__ import annotations

from .. import attribution as A
from .. import features as F
from .. import synthesis as S
from ..attribution import baselines
from ..attribution.lrp import composites as lrp_composites
from .spec import Method, Option, int_pair

_BATCH = Option("batch_size", int, None, "inputs per forward/backward pass (default: the method's)")
_NONLINEAR = Option("nonlinear", str, "raise", "non-rectifying activations (SiLU, GELU): refuse, or pass their "
                    "plain gradient", ("raise", "gradient"))
_INTERPOLATE = Option("interpolate", str, "bilinear", "upsampling of the layer map to the input size",
                      ("bilinear", "nearest"))
_SEED = Option("seed", int, None, "random seed (default: the global generator)")

METHODS = (
    # --- gradient family -----------------------------------------------------------------
    Method("saliency", A.saliency, "gradient", "|gradient| of the target score (Simonyan et al. 2014)"),
    Method("gradient_x_input", A.gradient_x_input, "gradient", "gradient × input (Captum InputXGradient)",
           map_rule="sum"),
    Method("smoothgrad", A.smoothgrad, "gradient", "mean |gradient| over noisy copies (Smilkov et al. 2017)",
           options=(Option("samples", int, 50, "noisy copies per image"),
                    Option("noise", float, 0.15, "noise std as a fraction of each image's value range"),
                    _BATCH, _SEED),
           report_options={"samples": 16}),
    Method("integrated_gradients", A.integrated_gradients, "gradient",
           "path integral of gradients from a baseline (Sundararajan et al. 2017)", map_rule="sum",
           options=(Option("steps", int, 50, "integration steps (Gauss-Legendre)"), _BATCH),
           report_options={"steps": 24}),
    Method("guided_backprop", A.guided_backprop, "gradient",
           "gradient with ReLUs passing only positive gradients (Springenberg et al. 2015)",
           options=(_NONLINEAR,)),
    Method("deconvnet", A.deconvnet, "gradient", "gradient through ReLUs applied to the gradient (Zeiler & "
           "Fergus 2014)", options=(_NONLINEAR,)),
    # --- CAM family --------------------------------------------------------------------------
    Method("grad_cam", A.grad_cam, "cam", "channel-weighted layer activations, weights = mean gradient "
           "(Selvaraju et al. 2017)", needs_layer=True, map_rule="as_is", options=(_INTERPOLATE,)),
    Method("guided_grad_cam", A.guided_grad_cam, "cam", "guided backprop × Grad-CAM", needs_layer=True,
           options=(_INTERPOLATE, _NONLINEAR)),
    # --- relevance family --------------------------------------------------------------------
    Method("lrp", A.lrp, "relevance", "layer-wise relevance propagation with Zennit's composites (Bach et al. "
           "2015, Montavon et al. 2019)", map_rule="sum",
           options=(Option("composite", str, "epsilon_plus_flat", "which rule each layer gets (Zennit's composites)",
                           lrp_composites.COMPOSITES),
                    Option("epsilon", float, 1e-6, "epsilon of the epsilon rule (fully connected layers)"),
                    Option("gamma", float, 0.25, "gamma of the gamma rule (epsilon_gamma_box's convolutions)"),
                    Option("nonlinear", str, "raise", "non-rectifying activations (SiLU, GELU): refuse, pass "
                           "relevance through unchanged, or multiply it by their gradient",
                           ("raise", "pass", "gradient")))),
    # --- perturbation family -----------------------------------------------------------------
    Method("occlusion", A.occlusion, "perturbation", "score drop when a sliding window is replaced by a "
           "baseline (Zeiler & Fergus 2014)", map_rule="as_is",
           options=(Option("window", int_pair, 16, "window size: N or H,W pixels"),
                    Option("stride", int_pair, 8, "stride: N or H,W pixels"),
                    Option("baseline", float, 0.0, "value written inside the window (model input space)"),
                    Option("mode", str, "exact", "exact (incremental), full recomputation, or approximate",
                           ("exact", "full", "approximate")),
                    _BATCH)),
    # --- controls ------------------------------------------------------------------------------
    Method("random", baselines.random_attribution, "control", "uniform random maps: the floor every method "
           "should beat in the faithfulness metrics", map_rule="as_is", report=False, options=(_SEED,)),
    # --- synthesis and features (run by their own subcommands) ---------------------------------
    Method("visualize_class", S.visualize_class, "synthesis", "an image that maximises a class score",
           command="visualize", section="class_visualization"),
    Method("visualize_neuron", S.visualize_neuron, "synthesis", "an image that maximises a neuron or channel",
           command="visualize"),
    Method("adversarial", S.adversarial, "synthesis", "adversarial examples (PGD, FGSM, ascent)",
           command="adversarial", section="adversarial"),
    Method("invert_features", S.invert_features, "synthesis", "an image reconstructed from a layer's activations "
           "(Mahendran & Vedaldi 2015)", command="invert", section="inversion"),
    Method("deep_dream", S.deep_dream, "synthesis", "amplify what a layer sees (DeepDream)", command="dream",
           section="dream"),
    Method("synthesize_texture", S.synthesize_texture, "synthesis", "a new image with the Gram statistics of a "
           "texture (Gatys et al. 2015)", command="texture", section="texture_style"),
    Method("style_transfer", S.style_transfer, "synthesis", "content painted in a style's Gram statistics "
           "(Gatys et al. 2016)", command="style", section="texture_style"),
    Method("filter_grid", F.filter_grid, "feature", "the filters of a convolution as tiles", command="filters",
           section="filters"),
    Method("extract_features", F.extract_features, "feature", "a layer's activations for every image",
           command="features"),
    Method("nearest_neighbors", F.nearest_neighbors, "feature", "nearest images in a layer's feature space",
           command="neighbors"),
    Method("embed", F.embed, "feature", "a 2-D map (PCA, t-SNE) of a feature space", command="embed"),
    Method("max_activating_patches", F.max_activating_patches, "feature", "the patches that activate each "
           "channel most", command="patches"),
)
