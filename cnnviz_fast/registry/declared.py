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
from ..attribution import perturbation as P
from ..attribution.lrp import composites as lrp_composites
from ..attribution.perturbation.segments import parse_baseline
from .spec import Method, Option, int_pair

_BATCH = Option("batch_size", int, None, "inputs per forward/backward pass (default: the method's)")
_NONLINEAR = Option("nonlinear", str, "raise", "non-rectifying activations (SiLU, GELU): refuse, or pass their "
                    "plain gradient", ("raise", "gradient"))
_INTERPOLATE = Option("interpolate", str, "bilinear", "upsampling of the layer map to the input size",
                      ("bilinear", "nearest"))
_SEED = Option("seed", int, None, "random seed (default: the global generator)")
_NOISE_OPTIONS = (Option("samples", int, 50, "noisy copies per image"),
                  Option("noise", float, 0.15, "noise std as a fraction of each image's value range"),
                  _BATCH, _SEED)
_MAX_POOL = Option("max_pool", str, "gradient", "DeepLIFT rule at max pooling: plain gradient (as Captum where "
                   "the pool follows a ReLU module) or Captum's rescale rule", ("gradient", "rescale"))
# segment-based perturbation methods
_SEGMENTS = Option("segments", str, "slic:100", "the features: 'slic:K' superpixels or a 'grid:K' of K x K cells")
_SEGMENT_BASELINE = Option("baseline", parse_baseline, 0.0, "value of a removed segment: a number, or 'blur' / "
                           "'blur:SIGMA' (a Gaussian-blurred copy)")
_COALITIONS = Option("samples", int, 200, "sampled coalitions of segments per image")
_TOLERANCE = Option("tolerance", float, 0.1, "draw among the source candidates within (1 + tolerance) of the "
                    "best match")
_TEXTURE_SEED = Option("seed", int, 0, "random seed: the same seed gives the same texture")


def _yes_no(text) -> bool:
    """A boolean option from the command line: true/false, yes/no, 1/0."""
    value = str(text).strip().lower()
    if value not in ("true", "false", "yes", "no", "1", "0"):
        raise ValueError(f"expected true or false, got {text!r}")
    return value in ("true", "yes", "1")


_EIGEN_SMOOTH = Option("eigen_smooth", _yes_no, False, "first principal component of the weighted activations "
                       "instead of their channel sum (pytorch-grad-cam's eigen_smooth)")
_AUG_SMOOTH = Option("aug_smooth", _yes_no, False, "mean over flipped and brightened copies, one pass "
                     "(pytorch-grad-cam's aug_smooth; maps then scaled to [0, 1])")
_CAM_OPTIONS = (_INTERPOLATE, _EIGEN_SMOOTH, _AUG_SMOOTH)

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
    Method("smoothgrad_sq", A.smoothgrad_sq, "gradient", "mean squared gradient over noisy copies (SmoothGrad², "
           "Captum NoiseTunnel smoothgrad_sq)", options=_NOISE_OPTIONS, report_options={"samples": 16}),
    Method("vargrad", A.vargrad, "gradient", "variance of |gradient| over noisy copies (VarGrad, Adebayo et al. "
           "2018)", options=_NOISE_OPTIONS, report_options={"samples": 16}),
    Method("gradient_shap", A.gradient_shap, "gradient", "expected gradients × (input - baseline) at random points "
           "between input and baseline (GradientSHAP, Lundberg & Lee 2017)", map_rule="sum",
           options=(Option("samples", int, 5, "random points per image"),
                    Option("noise", float, 0.0, "input noise std as a fraction of each image's value range"),
                    Option("baseline", parse_baseline, 0.0, "baseline value (model input space)"), _BATCH, _SEED),
           report_options={"samples": 16}),
    Method("deeplift", A.deeplift, "gradient", "DeepLIFT rescale rule: differences to a baseline run "
           "(Shrikumar et al. 2017)", map_rule="sum",
           options=(Option("baseline", parse_baseline, 0.0, "baseline value (model input space)"), _MAX_POOL, _NONLINEAR)),
    Method("deeplift_shap", A.deeplift_shap, "gradient", "DeepLIFT averaged over a batch of baselines "
           "(DeepLiftShap)", map_rule="sum", report=False,
           options=(Option("baseline", parse_baseline, 0.0, "baseline value (one baseline; a batch from Python)"), _BATCH,
                    _MAX_POOL, _NONLINEAR)),
    # --- CAM family --------------------------------------------------------------------------
    Method("grad_cam", A.grad_cam, "cam", "channel-weighted layer activations, weights = mean gradient "
           "(Selvaraju et al. 2017)", needs_layer=True, map_rule="as_is", options=_CAM_OPTIONS),
    Method("guided_grad_cam", A.guided_grad_cam, "cam", "guided backprop × Grad-CAM", needs_layer=True,
           options=(_INTERPOLATE, _NONLINEAR)),
    Method("grad_cam_plus_plus", A.grad_cam_plus_plus, "cam", "Grad-CAM with weights from positive gradients "
           "and second / third derivatives (Chattopadhay et al. 2018)", needs_layer=True, map_rule="as_is",
           options=_CAM_OPTIONS),
    Method("xgrad_cam", A.xgrad_cam, "cam", "Grad-CAM with activation-normalised gradient weights (Fu et al. "
           "2020)", needs_layer=True, map_rule="as_is", options=_CAM_OPTIONS),
    Method("hires_cam", A.hires_cam, "cam", "gradient × activation summed over channels (Draelos & Carin 2020)",
           needs_layer=True, map_rule="as_is", options=_CAM_OPTIONS),
    Method("layer_cam", A.layer_cam, "cam", "positive gradient × activation summed over channels; fuses layers "
           "(Jiang et al. 2021)", needs_layer=True, map_rule="as_is", options=_CAM_OPTIONS),
    Method("grad_cam_elementwise", A.grad_cam_elementwise, "cam", "ReLU(gradient × activation) summed over "
           "channels (pytorch-grad-cam)", needs_layer=True, map_rule="as_is", options=_CAM_OPTIONS),
    Method("eigen_cam", A.eigen_cam, "cam", "first principal component of the activations, class-agnostic, no "
           "backward (Muhammad & Yeasin 2020)", needs_layer=True, map_rule="as_is",
           options=(_INTERPOLATE, _AUG_SMOOTH)),
    Method("eigen_grad_cam", A.eigen_grad_cam, "cam", "first principal component of gradient × activation",
           needs_layer=True, map_rule="as_is", options=(_INTERPOLATE, _AUG_SMOOTH)),
    Method("full_grad", A.full_grad, "cam", "input-gradient and bias-gradient maps of every layer, summed "
           "(Srinivas & Fleuret 2019); uses all layers, takes none", map_rule="as_is",
           options=(_INTERPOLATE, _AUG_SMOOTH)),
    # --- relevance family --------------------------------------------------------------------
    Method("lrp", A.lrp, "relevance", "layer-wise relevance propagation with Zennit's composites (Bach et al. "
           "2015, Montavon et al. 2019)", map_rule="sum",
           options=(Option("composite", str, "epsilon_plus_flat", "which rule each layer gets (Zennit's composites)",
                           lrp_composites.COMPOSITES),
                    Option("epsilon", float, 1e-6, "epsilon of the epsilon rule (fully connected layers)"),
                    Option("gamma", float, 0.25, "gamma of the gamma rule (epsilon_gamma_box's convolutions)"),
                    _NONLINEAR)),  # lrp also takes nonlinear="pass" (Zennit's Pass rule) from Python
    # --- perturbation family -----------------------------------------------------------------
    Method("occlusion", A.occlusion, "perturbation", "score drop when a sliding window is replaced by a "
           "baseline (Zeiler & Fergus 2014)", map_rule="as_is",
           options=(Option("window", int_pair, 16, "window size: N or H,W pixels"),
                    Option("stride", int_pair, 8, "stride: N or H,W pixels"),
                    Option("baseline", parse_baseline, 0.0, "value written inside the window (model input space)"),
                    Option("mode", str, "exact", "exact (incremental), full recomputation, or approximate",
                           ("exact", "full", "approximate")),
                    _BATCH)),
    Method("feature_ablation", P.feature_ablation, "perturbation", "score drop when one segment is replaced "
           "by a baseline (Captum FeatureAblation over segments)", map_rule="sum",
           options=(_SEGMENTS, _SEGMENT_BASELINE, _BATCH,
                    Option("incremental", _yes_no, True, "small segments through the incremental engine (only "
                           "what a segment changes is recomputed); false: full passes only")),
           report_options={"segments": "grid:4"}),
    Method("shapley_sampling", P.shapley_sampling, "perturbation", "Shapley values of the segments from random "
           "permutations (Castro et al. 2009; Captum ShapleyValueSampling)", map_rule="sum",
           options=(_SEGMENTS, _SEGMENT_BASELINE, Option("samples", int, 25, "random permutations of the segments"),
                    _SEED, _BATCH),
           report_options={"segments": "grid:4", "samples": 2}),
    Method("kernel_shap", P.kernel_shap, "perturbation", "linear fit on coalitions of segments drawn from the "
           "Shapley kernel (Lundberg & Lee 2017; Captum KernelShap)", map_rule="sum",
           options=(_SEGMENTS, _SEGMENT_BASELINE, _COALITIONS, _SEED, _BATCH),
           report_options={"segments": "grid:4", "samples": 32}),
    Method("lime", P.lime, "perturbation", "sparse linear fit on random coalitions of segments, weighted by "
           "similarity (Ribeiro et al. 2016; Captum Lime)", map_rule="sum",
           options=(_SEGMENTS, _SEGMENT_BASELINE, _COALITIONS, _SEED, _BATCH),
           report_options={"segments": "grid:4", "samples": 32}),
    Method("score_cam", A.score_cam, "perturbation", "layer channels weighted by the softmax of the scores of "
           "the input masked by each channel (Wang et al. 2020)", needs_layer=True, map_rule="as_is",
           options=(_BATCH,)),
    Method("ablation_cam", A.ablation_cam, "perturbation", "layer channels weighted by the score drop when each "
           "is set to zero; the prefix runs once (Desai & Ramaswamy 2020)", needs_layer=True, map_rule="as_is",
           options=(_BATCH,)),
    Method("rise", A.rise, "perturbation", "mean score of randomly masked inputs, weighted by each mask "
           "(Petsiuk et al. 2018)", map_rule="as_is",
           options=(Option("masks", int, 4000, "number of random masks"),
                    Option("grid", int_pair, 7, "mask grid cells: N or H,W"),
                    Option("p", float, 0.5, "probability of a cell being on"),
                    _SEED, _BATCH),
           report_options={"masks": 500}),
    # --- controls ------------------------------------------------------------------------------
    Method("random", A.random_attribution, "control", "uniform random maps: the floor every method "
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
    # texture synthesis without a network (issue 23): `cnnviz texture --method quilt|efros-leung`
    Method("texture_quilt", S.texture_quilt, "synthesis", "a new texture of source patches joined along "
           "minimum-error cuts (image quilting, Efros & Freeman 2001)", command="texture", section="texture_style",
           options=(Option("patch", int, None, "side of the square patches (default: a quarter of the source)"),
                    Option("overlap", int, None, "pixels shared by neighbouring patches (default: patch / 6)"),
                    _TOLERANCE, _TEXTURE_SEED)),
    Method("texture_efros_leung", S.texture_efros_leung, "synthesis", "a new texture grown pixel by pixel from "
           "the best-matching source neighbourhoods (Efros & Leung 1999)", command="texture",
           section="texture_style",
           options=(Option("window", int_pair, 11, "odd side of the matched neighbourhood: N or H,W"), _TOLERANCE,
                    Option("batch", int, 64, "boundary pixels filled per step"), _TEXTURE_SEED)),
    Method("style_transfer", S.style_transfer, "synthesis", "content painted in a style's Gram statistics "
           "(Gatys et al. 2016)", command="style", section="texture_style"),
    Method("stylize", S.stylize, "synthesis", "content painted in a trained style by one forward pass of a "
           "feed-forward network (Johnson et al. 2016; several styles by conditional instance norm, Dumoulin "
           "et al. 2017)", command="style", section="texture_style"),
    Method("filter_grid", F.filter_grid, "feature", "the filters of a convolution as tiles", command="filters",
           section="filters"),
    Method("activation_grid", F.activation_grid, "feature", "a layer's feature maps for an image as tiles, "
           "optionally its top-k channels by mean activation", command="activations", section="activations",
           options=(Option("top_k", int, None, "only the k channels of largest mean activation (default: all)"),
                    Option("order", str, "mean", "tiles by decreasing mean activation, or by channel index",
                           ("mean", "index")),
                    Option("scale", str, "channel", "min-max scale per tile, or one scale per image",
                           ("channel", "shared")))),
    Method("extract_features", F.extract_features, "feature", "a layer's activations for every image",
           command="features"),
    Method("nearest_neighbors", F.nearest_neighbors, "feature", "nearest images in a layer's feature space",
           command="neighbors"),
    Method("embed", F.embed, "feature", "a 2-D map (PCA, t-SNE) of a feature space", command="embed"),
    Method("max_activating_patches", F.max_activating_patches, "feature", "the patches that activate each "
           "channel most", command="patches"),
)
