// Operator schemas of the `cnnviz` library. Kernels register per backend in
// ops/cpu/*_cpu.cpp and ops/cuda/*_cuda.cu; fake kernels and autograd are registered
// in Python (cnnviz_fast/ops/__init__.py).
#include <Python.h>

#include <torch/library.h>

extern "C" {
// `import cnnviz_fast._C` loads this shared library (running the registrations below);
// the module itself is empty.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C", /* name */
      NULL, /* doc */
      -1, /* size */
      NULL, /* methods */
  };
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(cnnviz, m) {
  // images [N, C, H, W] -> [N, count, C, H, W]: window positions first .. first+count-1
  // (row-major over Captum's grid) set to baseline (numel 1, or [N, C, H, W]).
  m.def(
      "occlude(Tensor images, int[2] window, int[2] stride, Tensor baseline, int first, "
      "int count) -> Tensor");
  // deltas [N, P] -> [N, H, W]: per-pixel mean of the deltas of the windows covering it.
  m.def("occlusion_accumulate(Tensor deltas, int H, int W, int[2] window, int[2] stride) -> Tensor");
  // relu forward (clamp(x, 0, upper) with an upper bound: ReLU6, Hardtanh(0, upper));
  // mode ("guided" | "deconvnet" | "plain") selects the backward rule.
  m.def("guided_relu(Tensor x, str mode, float? upper=None) -> Tensor");
  m.def("_guided_relu_backward(Tensor grad, Tensor out, str mode, float? upper=None) -> Tensor");
  // features [N, C, *spatial] -> [N, C, C] = F F^T / S.
  m.def("gram(Tensor features) -> Tensor");
  // -> (loss = weight * mean((G - T)^2) [0-dim, features' dtype],
  //     diff = G - T [N, C, C], opmath dtype, saved for the backward).
  m.def("gram_loss(Tensor features, Tensor target_gram, float weight) -> (Tensor, Tensor)");
  // d loss / d features = (grad * 2 * weight / (N C^2 S)) * (diff + diff^T) @ F.
  m.def(
      "_gram_loss_backward(Tensor grad_loss, Tensor features, Tensor diff, float weight) -> "
      "Tensor");

  // images [N, C, H, W] -> [N, K, C, H, W]: step k moves the counts[k] cells of lowest
  // rank (ranks [N, rows*cols] over ph x pw patches, 0 = most important): deletion sets
  // them to baseline (numel 1, or [N, C, H, W]); insertion shows only them over baseline.
  m.def(
      "progressive_mask(Tensor images, Tensor ranks, Tensor baseline, int[] counts, "
      "int[2] patch, bool insertion) -> Tensor");

  // RISE (Petsiuk et al. 2018): masks generated from a seed inside the kernels (see
  // ops/common/rise_math.h), never stored. images [N, C, H, W] -> [N, count, C, H, W]:
  // out[n, k] = images[n] * mask(first + k), masks of a grid_h x grid_w grid of cells on
  // with probability p, upsampled bilinearly at a random shift.
  m.def("rise_mask(Tensor images, int seed, int[2] grid, float p, int first, int count) -> Tensor");
  // scores [N, count] -> [N, H, W] = sum_k scores[n, k] * mask(first + k) (opmath accumulation).
  m.def(
      "rise_accumulate(Tensor scores, int H, int W, int seed, int[2] grid, float p, int first) -> "
      "Tensor");

  // Segment masking (feature ablation, Shapley sampling, KernelSHAP, LIME): images
  // [N, C, H, W], segments [N, H, W] (int64 ids), keep [R, K] (bool), rows [R] (int64) ->
  // [R, C, H, W]: out[r] = images[rows[r]] where keep[r, segments[rows[r]]], else baseline
  // (numel 1, or [N, C, H, W]: baseline[rows[r]]). In the images' layout (channels-last in,
  // channels-last out); ids outside [0, K) show the baseline.
  m.def("segment_mask(Tensor images, Tensor segments, Tensor keep, Tensor rows, Tensor baseline) -> Tensor");
}
