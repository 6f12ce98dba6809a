#pragma once

#include "macros.h"

namespace cnnviz {
namespace guided_relu {

// Backward rule of the modified ReLU (the schema takes the mode as a string).
enum class Mode : int { Guided = 0, Deconvnet = 1, Plain = 2 };

// relu; NaN propagates like torch.relu.
template <typename T>
CNNVIZ_HOST_DEVICE inline T forward(T x) {
  return x < T(0) ? T(0) : x;
}

// Gradient w.r.t. the input from the incoming gradient and the saved output
// (out > 0 iff input > 0).
template <Mode M, typename T>
CNNVIZ_HOST_DEVICE inline T backward(T grad, T out) {
  if (M == Mode::Plain) {
    return out > T(0) ? grad : T(0);
  } else if (M == Mode::Guided) {
    return (out > T(0) && grad > T(0)) ? grad : T(0);
  } else {
    return grad > T(0) ? grad : T(0);
  }
}

} // namespace guided_relu
} // namespace cnnviz
