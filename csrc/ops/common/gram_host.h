#pragma once

// Device-agnostic host code of the Gram ops (the GEMMs go through at::mm, i.e. MKL /
// cuBLAS); the elementwise passes live in cpu/gram_cpu.cpp and cuda/gram_cuda.cu.
#include <ATen/core/Tensor.h>

namespace cnnviz {
namespace gram {

struct Features {
  at::Tensor f;  // [N, C, S], contiguous, opmath dtype (float32 for half/bf16) unless kept 16-bit
  int64_t N, C, S;
};

// Checks features [N, C, *spatial] and returns them as a contiguous [N, C, S] opmath tensor;
// keep_16bit leaves half/bf16 features in their dtype (for a GEMM that reads 16-bit inputs
// and accumulates and writes in float32).
Features prepare_features(const at::Tensor& features, bool keep_16bit = false);

// Checks target_gram ([N, C, C] or [C, C], features' dtype and device); returns it
// contiguous in opmath dtype.
at::Tensor prepare_target(const at::Tensor& target, const at::Tensor& features, int64_t N, int64_t C);

// Smallest channel block of the symmetric product (64; CNNVIZ_GRAM_TILE overrides it).
int64_t tile_size(int64_t C);

// R[n] = F[n] F[n]^T on its upper triangle only (j >= i; the rest is left unset), by
// recursive halving into batched GEMMs: ~(1/2 + 1/2^(L+1)) of a full product.
at::Tensor symmetric_product(const at::Tensor& f, int64_t min_block);

} // namespace gram
} // namespace cnnviz
