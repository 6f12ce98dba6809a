#pragma once

#include <cmath>
#include <optional>
#include <string_view>

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "guided_relu_math.h"

namespace cnnviz {
namespace guided_relu {

inline Mode parse_mode(std::string_view mode) {
  if (mode == "guided") {
    return Mode::Guided;
  }
  if (mode == "deconvnet") {
    return Mode::Deconvnet;
  }
  TORCH_CHECK_VALUE(
      mode == "plain", "mode must be one of 'guided', 'deconvnet', 'plain', got '", mode, "'");
  return Mode::Plain;
}

// The upper bound of the linear range: none (plain ReLU) or a number > 0; +inf is none.
inline bool parse_upper(const std::optional<double>& upper) {
  if (!upper.has_value()) {
    return false;
  }
  TORCH_CHECK_VALUE(*upper > 0, "upper must be None or a number > 0, got ", *upper);
  return std::isfinite(*upper);
}

// Elementwise kernels walk the storage linearly: keep contiguous and channels_last
// tensors as they are (output via empty_like keeps the layout), copy anything else.
inline at::Tensor dense_layout(const at::Tensor& t) {
  if (t.is_contiguous() || (t.dim() == 4 && t.is_contiguous(at::MemoryFormat::ChannelsLast))) {
    return t;
  }
  return t.contiguous();
}

// grad in the same storage order as `out_` (itself dense_layout()-ed).
inline at::Tensor like_layout(const at::Tensor& grad, const at::Tensor& out_) {
  return out_.is_contiguous() ? grad.contiguous()
                              : grad.contiguous(at::MemoryFormat::ChannelsLast);
}

inline void check_backward_args(const at::Tensor& grad, const at::Tensor& out) {
  TORCH_CHECK(
      grad.sizes() == out.sizes(), "grad must have the shape of out ", out.sizes(), ", got ",
      grad.sizes());
  TORCH_CHECK(
      grad.scalar_type() == out.scalar_type(), "grad must have the dtype of out ",
      out.scalar_type(), ", got ", grad.scalar_type());
  TORCH_CHECK(
      grad.device() == out.device(), "grad must be on the device of out ", out.device(),
      ", got ", grad.device());
}

} // namespace guided_relu
} // namespace cnnviz
