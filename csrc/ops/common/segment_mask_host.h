#pragma once

// Host-side argument checks shared by the CPU and CUDA entry points of segment_mask.
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "image_checks.h"

namespace cnnviz {
namespace segment {

inline void check_segment_mask_args(
    const at::Tensor& images, const at::Tensor& segments, const at::Tensor& keep,
    const at::Tensor& rows, const at::Tensor& baseline) {
  check_images(images);
  const int64_t N = images.size(0), H = images.size(2), W = images.size(3);
  TORCH_CHECK(
      segments.dim() == 3 && segments.size(0) == N && segments.size(1) == H &&
          segments.size(2) == W,
      "segments must have shape [N, H, W] = [", N, ", ", H, ", ", W, "], got ", segments.sizes());
  TORCH_CHECK(
      segments.scalar_type() == at::kLong, "segments must be an int64 tensor, got ",
      segments.scalar_type());
  TORCH_CHECK(
      keep.dim() == 2, "keep must be a 2-D tensor [R, K], got ", keep.dim(), "-D");
  TORCH_CHECK(keep.scalar_type() == at::kBool, "keep must be a bool tensor, got ", keep.scalar_type());
  TORCH_CHECK(
      rows.dim() == 1 && rows.size(0) == keep.size(0), "rows must have shape [R] = [",
      keep.size(0), "] (one image per row of keep), got ", rows.sizes());
  TORCH_CHECK(rows.scalar_type() == at::kLong, "rows must be an int64 tensor, got ", rows.scalar_type());
  for (const auto* t : {&segments, &keep, &rows}) {
    TORCH_CHECK(
        t->device() == images.device(), "segments, keep and rows must be on the images' device ",
        images.device(), ", got ", t->device());
  }
  check_baseline(images, baseline);
}

// The output follows the images' layout: channels-last in, channels-last out (an image
// that is both, e.g. C = 1, counts as contiguous).
inline bool is_channels_last(const at::Tensor& images) {
  return !images.is_contiguous() && images.is_contiguous(at::MemoryFormat::ChannelsLast);
}

inline at::MemoryFormat layout_of(bool channels_last) {
  return channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

} // namespace segment
} // namespace cnnviz
