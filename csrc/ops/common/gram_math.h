#pragma once

#include <cstdint>

#include "macros.h"

namespace cnnviz {
namespace gram {

// Only the upper triangle (j >= i) of the raw product R = F F^T is computed (see
// gram_host.h). Entry (i, j) of the full product is read from there: the result is
// exactly symmetric.
template <typename acc_t>
CNNVIZ_HOST_DEVICE inline acc_t symmetric_entry(const acc_t* R, int64_t C, int64_t i, int64_t j) {
  return j >= i ? R[i * C + j] : R[j * C + i];
}

// D = G - T with G = R / S.
template <typename acc_t>
CNNVIZ_HOST_DEVICE inline acc_t loss_diff(acc_t raw, acc_t inv_s, acc_t target) {
  return raw * inv_s - target;
}

template <typename acc_t>
CNNVIZ_HOST_DEVICE inline acc_t square(acc_t d) {
  return d * d;
}

// Backward matrix M = coef * (D + D^T), coef = grad * 2 * weight / (N * C^2 * S),
// i.e. dF = 4 * weight / (N C^2 S) * sym(D) F = M F.
template <typename acc_t>
CNNVIZ_HOST_DEVICE inline acc_t backward_entry(acc_t d_ij, acc_t d_ji, acc_t coef) {
  return coef * (d_ij + d_ji);
}

} // namespace gram
} // namespace cnnviz
