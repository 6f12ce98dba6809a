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

// clamp(x, 0, upper) (ReLU6, Hardtanh(0, upper)); NaN propagates like torch.clamp.
template <typename T>
CNNVIZ_HOST_DEVICE inline T forward(T x, T upper) {
  const T r = forward(x);
  return r > upper ? upper : r;
}

// Gradient w.r.t. the input from the incoming gradient and the saved output. The
// linear range is 0 < out < upper (exclusive at both ends, like torch's relu and
// hardtanh backward: out == upper also means input >= upper, saturated), so the output
// alone decides it. Deconvnet ignores the lower side (the sign of the gradient replaces
// it) but keeps the upper one: a saturated unit passes nothing back.
template <Mode M, bool Bounded, typename T>
CNNVIZ_HOST_DEVICE inline T backward(T grad, T out, T upper) {
  const bool below = !Bounded || out < upper;
  if (M == Mode::Plain) {
    return (out > T(0) && below) ? grad : T(0);
  } else if (M == Mode::Guided) {
    return (out > T(0) && below && grad > T(0)) ? grad : T(0);
  } else {
    return (below && grad > T(0)) ? grad : T(0);
  }
}

} // namespace guided_relu
} // namespace cnnviz
