#pragma once

// RISE masks (Petsiuk et al. 2018) from a seed: per-element math shared by the CPU and CUDA
// kernels and mirrored by cnnviz_fast/ops/reference.py (rise_masks).
//
// Mask m is a grid_h x grid_w grid of cells, each on (1) with probability p, resized
// bilinearly to ((grid_h + 1) * cell_h) x ((grid_w + 1) * cell_w) pixels, with
// cell = ceil(image / grid), and cropped to H x W at a random shift (dy, dx) in
// [0, cell_h) x [0, cell_w): scikit-image's resize(order=1, mode="reflect") of the paper's
// code (half-pixel centres, mirrored border). Every random number is a counter-based hash of
// (seed, m, j), so any chunk of masks is generated independently and on any device, and
// the values are exact integer ratios: the CPU and CUDA kernels give identical masks.
#include <cstdint>

#include "macros.h"

namespace cnnviz {
namespace rise {

// Chris Wellons' "lowbias32" integer hash (a bijection on 32-bit words).
CNNVIZ_HOST_DEVICE inline uint32_t hash32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352dU;
  x ^= x >> 15;
  x *= 0x846ca68bU;
  x ^= x >> 16;
  return x;
}

// Key of mask m of a seed (both taken modulo 2^64 and 2^32).
CNNVIZ_HOST_DEVICE inline uint32_t mask_key(int64_t seed, int64_t m) {
  const uint64_t s = static_cast<uint64_t>(seed);
  const uint32_t k0 = hash32(static_cast<uint32_t>(s) ^ hash32(static_cast<uint32_t>(s >> 32) ^ 0x9e3779b9U));
  return hash32(k0 ^ hash32(static_cast<uint32_t>(m) + 0x85ebca6bU));
}

// Random word j of a mask: j = cell index (row-major) for the cells, grid_h * grid_w and
// grid_h * grid_w + 1 for the vertical and horizontal shifts.
CNNVIZ_HOST_DEVICE inline uint32_t word(uint32_t key, int64_t j) {
  return hash32(key + static_cast<uint32_t>(j) * 0x9e3779b9U);
}

// A cell is on when its 24-bit uniform number u / 2^24 is below p: u < threshold, with
// threshold = ceil(p * 2^24) computed once on the host.
CNNVIZ_HOST_DEVICE inline bool cell_on(uint32_t key, int64_t j, int64_t threshold) {
  return static_cast<int64_t>(word(key, j) >> 8) < threshold;
}

// Mirrored index into [0, n) (numpy "reflect": the border sample is not repeated); the
// bilinear taps reach at most one cell outside.
CNNVIZ_HOST_DEVICE inline int64_t mirror(int64_t i, int64_t n) {
  if (n == 1) {
    return 0;
  }
  return i < 0 ? -i : (i >= n ? 2 * (n - 1) - i : i);
}

// Bilinear taps of upsampled pixel i (already shifted) of a grid of n cells resized to
// `up` pixels: source coordinate ((2i + 1) n - up) / (2 up) = i0 + w1 / den, den = 2 up.
struct Taps {
  int64_t i0, i1;  // mirrored grid indices
  int64_t w0, w1;  // integer weights, w0 + w1 = den
};

CNNVIZ_HOST_DEVICE inline Taps taps(int64_t i, int64_t n, int64_t up) {
  const int64_t num = (2 * i + 1) * n - up;
  const int64_t den = 2 * up;
  // floor division (num may be negative)
  int64_t q = num / den;
  if (num % den != 0 && num < 0) {
    --q;
  }
  Taps t;
  t.w1 = num - q * den;
  t.w0 = den - t.w1;
  t.i0 = mirror(q, n);
  t.i1 = mirror(q + 1, n);
  return t;
}

// Geometry of the masks of one call.
struct Geometry {
  int64_t gh, gw;          // grid cells
  int64_t cell_h, cell_w;  // ceil(H / gh), ceil(W / gw)
  int64_t up_h, up_w;      // (gh + 1) * cell_h, (gw + 1) * cell_w
  int64_t threshold;       // ceil(p * 2^24)
};

// Shifts of mask `key`: dy in [0, cell_h), dx in [0, cell_w).
CNNVIZ_HOST_DEVICE inline int64_t shift_y(uint32_t key, const Geometry& g) {
  return static_cast<int64_t>(word(key, g.gh * g.gw) % static_cast<uint32_t>(g.cell_h));
}
CNNVIZ_HOST_DEVICE inline int64_t shift_x(uint32_t key, const Geometry& g) {
  return static_cast<int64_t>(word(key, g.gh * g.gw + 1) % static_cast<uint32_t>(g.cell_w));
}

// Numerator of the mask value from the taps of its row and column (denominator
// den_y * den_x = 4 up_h up_w): sum over the on corners of the products of weights.
// `on(r, c)` says whether grid cell (r, c) is on.
template <typename On>
CNNVIZ_HOST_DEVICE inline int64_t numerator(const Taps& ty, const Taps& tx, On on) {
  int64_t v = 0;
  if (on(ty.i0, tx.i0)) v += ty.w0 * tx.w0;
  if (on(ty.i0, tx.i1)) v += ty.w0 * tx.w1;
  if (on(ty.i1, tx.i0)) v += ty.w1 * tx.w0;
  if (on(ty.i1, tx.i1)) v += ty.w1 * tx.w1;
  return v;
}

// The mask value as a correctly rounded double (one IEEE division: the same on every device).
CNNVIZ_HOST_DEVICE inline double value(int64_t numerator, const Geometry& g) {
  return static_cast<double>(numerator) / static_cast<double>(4 * g.up_h * g.up_w);
}

} // namespace rise
} // namespace cnnviz
