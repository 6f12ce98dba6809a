#include "common/gram_host.h"

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <cstdlib>

namespace cnnviz {
namespace gram {

Features prepare_features(const at::Tensor& features, bool keep_16bit) {
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
  const auto acc = keep_16bit ? features.scalar_type() : at::toOpMathType(features.scalar_type());
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
  // CNNVIZ_GRAM_TILE overrides the smallest block size (for tuning benchmarks).
  static const int64_t forced = [] {
    const char* env = std::getenv("CNNVIZ_GRAM_TILE");
    return env ? std::atoll(env) : int64_t(0);
  }();
  // Blocks of fewer than 64 channels make GEMMs inefficient for little saved work.
  return forced > 0 ? forced : 64;
}

at::Tensor symmetric_product(const at::Tensor& f, int64_t min_block) {
  const int64_t N = f.size(0), C = f.size(1), S = f.size(2);
  auto R = at::empty({N, C, C}, f.options());
  // Recursive halving, L levels deep (blocks of C / 2^L >= min_block channels):
  //   - every finest diagonal block F_i F_i^T, all in ONE batched GEMM over a view of F;
  //   - per level l, the upper off-diagonal block of each pair of sibling blocks,
  //     F_2k F_2k+1^T, again in ONE batched GEMM.
  // Work: (1/2 + 1/2^(L+1)) of a full product (0.625 for L = 2, 0.5625 for L = 3) in L + 1
  // large GEMMs. Only the upper triangle (j >= i) of R is written.
  constexpr int kMaxLevels = 3;
  int L = 0;
  while (L < kMaxLevels && C % (int64_t(2) << L) == 0 && C / (int64_t(2) << L) >= min_block) {
    ++L;
  }
  if (L == 0) {
    at::bmm_out(R, f, f.transpose(1, 2));
    return R;
  }
  const int64_t nb = int64_t(1) << L, b = C / nb;
  {
    const auto fd = f.view({N * nb, b, S});
    const auto diag = at::bmm(fd, fd.transpose(1, 2)).view({N, nb, b, b});
    // diagonal block i of R is R5[:, i, :, i, :]
    R.view({N, nb, b, nb, b}).diagonal(0, 1, 3).permute({0, 3, 1, 2}).copy_(diag);
  }
  for (int l = 1; l <= L; ++l) {
    const int64_t bl = C >> l, pairs = int64_t(1) << (l - 1);
    const auto fl = f.view({N, pairs, 2, bl, S});
    const auto A = fl.select(2, 0).reshape({N * pairs, bl, S});  // views: no copy
    const auto B = fl.select(2, 1).reshape({N * pairs, bl, S});
    const auto off = at::bmm(A, B.transpose(1, 2)).view({N, pairs, bl, bl});
    // block (row block 2k, column block 2k+1) of R, for every pair k
    R.view({N, pairs, 2, bl, pairs, 2, bl})
        .select(5, 1)
        .select(2, 0)
        .diagonal(0, 1, 3)
        .permute({0, 3, 1, 2})
        .copy_(off);
  }
  return R;
}

} // namespace gram
} // namespace cnnviz
