#include <algorithm>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../common/segment_mask_host.h"
#include "../common/segment_mask_math.h"
#include "cpu_utils.h"

namespace cnnviz {
namespace ops {

namespace {

constexpr int64_t kChunkElements = 1 << 15;

// One task per output image row (r, y): the keep flags of the row are looked up once
// (segment id -> keep[r, id]; channels-last: repeated over the C channels of each pixel),
// then every channel row (or the interleaved row) is a plain, vectorisable blend.
template <typename scalar_t, bool kChannelsLast, bool kFullBaseline>
void segment_mask_kernel(
    const scalar_t* images, const int64_t* segments, const bool* keep, const int64_t* rows,
    const scalar_t* baseline, scalar_t* out, int64_t R, int64_t K, int64_t C, int64_t H,
    int64_t W) {
  const scalar_t b0 = baseline[0];
  const int64_t grain = std::max<int64_t>(1, kChunkElements / (C * W));
  at::parallel_for(0, R * H, grain, [&](int64_t begin, int64_t end) {
    std::vector<uint8_t> flags(kChannelsLast ? W * C : W);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t r = task / H, y = task % H;
      const int64_t n = rows[r];
      const int64_t* ids = segments + (n * H + y) * W;
      const bool* keep_row = keep + r * K;
      if (kChannelsLast) {
        for (int64_t x = 0; x < W; ++x) {
          const uint8_t kept = segment::keeps(keep_row, K, ids[x]);
          for (int64_t c = 0; c < C; ++c) {
            flags[x * C + c] = kept;
          }
        }
        const int64_t src_off = segment::offset(n, 0, y, 0, C, H, W, true);
        const scalar_t* src = images + src_off;
        const scalar_t* base = kFullBaseline ? baseline + src_off : nullptr;
        scalar_t* dst = out + segment::offset(r, 0, y, 0, C, H, W, true);
        for (int64_t i = 0; i < W * C; ++i) {
          dst[i] = segment::select(flags[i] != 0, src[i], kFullBaseline ? base[i] : b0);
        }
      } else {
        for (int64_t x = 0; x < W; ++x) {
          flags[x] = segment::keeps(keep_row, K, ids[x]);
        }
        for (int64_t c = 0; c < C; ++c) {
          const int64_t src_off = segment::offset(n, c, y, 0, C, H, W, false);
          const scalar_t* src = images + src_off;
          const scalar_t* base = kFullBaseline ? baseline + src_off : nullptr;
          scalar_t* dst = out + segment::offset(r, c, y, 0, C, H, W, false);
          for (int64_t x = 0; x < W; ++x) {
            dst[x] = segment::select(flags[x] != 0, src[x], kFullBaseline ? base[x] : b0);
          }
        }
      }
    }
  });
}

at::Tensor segment_mask_cpu(
    const at::Tensor& images, const at::Tensor& segments, const at::Tensor& keep,
    const at::Tensor& rows, const at::Tensor& baseline) {
  TORCH_CHECK(images.device().is_cpu(), "images must be a CPU tensor, got ", images.device());
  segment::check_segment_mask_args(images, segments, keep, rows, baseline);
  const int64_t N = images.size(0), C = images.size(1), H = images.size(2), W = images.size(3);
  const int64_t R = keep.size(0), K = keep.size(1);
  const bool channels_last = segment::is_channels_last(images);
  const auto format = segment::layout_of(channels_last);
  auto out = at::empty({R, C, H, W}, images.options().memory_format(format));
  if (out.numel() == 0) {
    return out;
  }
  const auto rw = rows.contiguous();
  const int64_t* row_ptr = rw.const_data_ptr<int64_t>();
  for (int64_t r = 0; r < R; ++r) {
    TORCH_CHECK(
        row_ptr[r] >= 0 && row_ptr[r] < N, "rows must hold image indices in [0, ", N, "), got ",
        row_ptr[r], " at ", r);
  }
  cpu::advise_huge_pages(out);
  const auto img = images.contiguous(format);
  const auto seg = segments.contiguous();
  const auto kp = keep.contiguous();
  const bool full = baseline.numel() != 1;
  const auto base = full ? baseline.contiguous(format) : baseline.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::ScalarType::Half, at::ScalarType::BFloat16, images.scalar_type(), "segment_mask_cpu", [&] {
        using Kernel = void (*)(
            const scalar_t*, const int64_t*, const bool*, const int64_t*, const scalar_t*, scalar_t*,
            int64_t, int64_t, int64_t, int64_t, int64_t);
        const Kernel kernel = channels_last
            ? (full ? &segment_mask_kernel<scalar_t, true, true> : &segment_mask_kernel<scalar_t, true, false>)
            : (full ? &segment_mask_kernel<scalar_t, false, true> : &segment_mask_kernel<scalar_t, false, false>);
        kernel(
            img.const_data_ptr<scalar_t>(), seg.const_data_ptr<int64_t>(), kp.const_data_ptr<bool>(),
            row_ptr, base.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), R, K, C, H, W);
      });
  return out;
}

} // namespace

TORCH_LIBRARY_IMPL(cnnviz, CPU, m) {
  m.impl("segment_mask", &segment_mask_cpu);
}

} // namespace ops
} // namespace cnnviz
