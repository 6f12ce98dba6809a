#include "common/gram_host.h"

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <cstdlib>

namespace cnnviz {
namespace gram {

Features prepare_features(const at::Tensor& features) {
  TORCH_CHECK(
      features.dim() >= 2, "features must be a tensor [N, C, *spatial], got ", features.dim(),
      "-D");
  TORCH_CHECK(
      at::isFloatingType(features.scalar_type()),
      "features must be a floating-point tensor, got ", features.scalar_type());
  Features out;
  out.N = features.size(0);
  out.C = features.size(1);
  out.S = 1;
  for (int64_t d = 2; d < features.dim(); ++d) {
    out.S *= features.size(d);
  }
  TORCH_CHECK(
      out.S > 0, "features must have at least one spatial position, got shape ",
      features.sizes());
  const auto acc = at::toOpMathType(features.scalar_type());
  out.f = features.reshape({out.N, out.C, out.S}).to(acc).contiguous();
  return out;
}

at::Tensor prepare_target(
    const at::Tensor& target, const at::Tensor& features, int64_t N, int64_t C) {
  TORCH_CHECK(
      (target.dim() == 3 && target.size(0) == N && target.size(1) == C && target.size(2) == C) ||
          (target.dim() == 2 && target.size(0) == C && target.size(1) == C),
      "target_gram must have shape [N, C, C] = [", N, ", ", C, ", ", C, "] or [C, C] = [", C,
      ", ", C, "], got ", target.sizes());
  TORCH_CHECK(
      target.scalar_type() == features.scalar_type(), "target_gram must have the features' dtype ",
      features.scalar_type(), ", got ", target.scalar_type());
  TORCH_CHECK(
      target.device() == features.device(), "target_gram must be on the features' device ",
      features.device(), ", got ", target.device());
  return target.to(at::toOpMathType(features.scalar_type())).contiguous();
}

int64_t tile_size(int64_t C) {
  // CNNVIZ_GRAM_TILE overrides the row-block size (for tuning benchmarks).
  static const int64_t forced = [] {
    const char* env = std::getenv("CNNVIZ_GRAM_TILE");
    return env ? std::atoll(env) : int64_t(0);
  }();
  if (forced > 0) {
    return forced;
  }
  // ~4 row blocks: (1 + 1/4) / 2 = 0.625 of a full product in 4 large GEMMs; more, smaller
  // blocks save little more work and lose GEMM efficiency (and pay per-call overhead).
  constexpr int64_t kMinTile = 64;
  int64_t tile = (C + 3) / 4;
  tile = (tile + 15) / 16 * 16;
  return tile < kMinTile ? kMinTile : tile;
}

at::Tensor symmetric_product(const at::Tensor& f, int64_t tile) {
  const int64_t N = f.size(0), C = f.size(1);
  auto R = at::empty({N, C, C}, f.options());
  if (C <= tile) {
    at::bmm_out(R, f, f.transpose(1, 2));
    return R;
  }
  // row block [r, r+rows) x columns [r, C) of every image: one batched GEMM per block,
  // copied into R (bmm_out into the strided view takes a slow path on CPU). The upper
  // triangle of R is complete afterwards.
  for (int64_t r = 0; r < C; r += tile) {
    const int64_t rows = std::min(tile, C - r);
    R.slice(1, r, r + rows)
        .slice(2, r, C)
        .copy_(at::bmm(f.slice(1, r, r + rows), f.slice(1, r, C).transpose(1, 2)));
  }
  return R;
}

} // namespace gram
} // namespace cnnviz
