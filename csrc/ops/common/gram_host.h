#pragma once

// Device-agnostic host code of the Gram ops (the GEMMs go through at::mm, i.e. MKL /
// cuBLAS); the elementwise passes live in cpu/gram_cpu.cpp and cuda/gram_cuda.cu.
#include <ATen/core/Tensor.h>

namespace cnnviz {
namespace gram {

struct Features {
  at::Tensor f;  // [N, C, S], contiguous, opmath dtype (float32 for half/bf16)
  int64_t N, C, S;
};

// Checks features [N, C, *spatial] and returns them as a contiguous [N, C, S] opmath tensor.
Features prepare_features(const at::Tensor& features);

// Checks target_gram ([N, C, C] or [C, C], features' dtype and device); returns it
// contiguous in opmath dtype.
at::Tensor prepare_target(const at::Tensor& target, const at::Tensor& features, int64_t N, int64_t C);

// Row-block size for the symmetric product.
int64_t tile_size(int64_t C);

// R[n] = F[n] F[n]^T computed only on the row blocks' upper part (see gram_math.h):
// ~(1 + 1/B)/2 of a full product for B = ceil(C / tile) blocks.
at::Tensor symmetric_product(const at::Tensor& f, int64_t tile);

} // namespace gram
} // namespace cnnviz
