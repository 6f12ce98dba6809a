#pragma once

// Host-side checks of the image batch and its baseline, shared by the masking ops
// (occlude, progressive_mask).
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace cnnviz {

inline void check_images(const at::Tensor& images) {
  TORCH_CHECK(
      images.dim() == 4, "images must be a 4-D tensor [N, C, H, W], got ", images.dim(), "-D");
  TORCH_CHECK(
      at::isFloatingType(images.scalar_type()), "images must be a floating-point tensor, got ",
      images.scalar_type());
}

// The value written where an image is masked: one element, or one per image element.
inline void check_baseline(const at::Tensor& images, const at::Tensor& baseline) {
  TORCH_CHECK(
      baseline.device() == images.device(), "baseline must be on the images' device ",
      images.device(), ", got ", baseline.device());
  TORCH_CHECK(
      baseline.scalar_type() == images.scalar_type(), "baseline must have the images' dtype ",
      images.scalar_type(), ", got ", baseline.scalar_type());
  TORCH_CHECK(
      baseline.numel() == 1 || baseline.sizes() == images.sizes(),
      "baseline must have 1 element or the images' shape ", images.sizes(), ", got ",
      baseline.sizes());
}

} // namespace cnnviz
