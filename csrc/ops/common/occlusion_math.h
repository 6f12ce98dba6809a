#pragma once

#include <cstdint>

#include "macros.h"

namespace cnnviz {
namespace occlusion {

// Half-open, border-clipped bounds [r0, r1) x [c0, c1) of one occlusion window.
struct Window {
  int64_t r0, r1, c0, c1;
};

// Window p of Captum's grid, numbered row-major: top-left corner at
// ((p / cols) * sh, (p % cols) * sw), size kh x kw, clipped at the border.
CNNVIZ_HOST_DEVICE inline Window window_bounds(
    int64_t p, int64_t cols, int64_t kh, int64_t kw, int64_t sh, int64_t sw,
    int64_t H, int64_t W) {
  // with stride > window the last window can start past the border: it is then empty
  const int64_t r = (p / cols) * sh;
  const int64_t c = (p % cols) * sw;
  Window w;
  w.r0 = r < H ? r : H;
  w.c0 = c < W ? c : W;
  w.r1 = r + kh < H ? r + kh : H;
  w.c1 = c + kw < W ? c + kw : W;
  return w;
}

CNNVIZ_HOST_DEVICE inline bool row_inside(const Window& w, int64_t h) {
  return h >= w.r0 && h < w.r1;
}

CNNVIZ_HOST_DEVICE inline bool col_inside(const Window& w, int64_t x) {
  return x >= w.c0 && x < w.c1;
}

CNNVIZ_HOST_DEVICE inline bool inside(const Window& w, int64_t h, int64_t x) {
  return row_inside(w, h) && col_inside(w, x);
}

// out = baseline inside the window, image elsewhere.
template <typename T>
CNNVIZ_HOST_DEVICE inline T select(bool in_window, T image, T baseline) {
  return in_window ? baseline : image;
}

// Row `row` of occlude's output [N, count, C, H, W] (rows of W elements): image n, window
// first + k, and row ch = c * H + h of the image's stacked planes. Decoded once per row, so
// the kernels do no index division per element.
struct OutputRow {
  int64_t n, k, ch, h;
};

CNNVIZ_HOST_DEVICE inline OutputRow output_row(int64_t row, int64_t C, int64_t H, int64_t count) {
  const int64_t CH = C * H;
  OutputRow r;
  const int64_t nk = row / CH;
  r.ch = row - nk * CH;
  r.n = nk / count;
  r.k = nk - r.n * count;
  r.h = r.ch % H;
  return r;
}

// V consecutive elements, aligned to their size (V = 16 / sizeof(T): one 128-bit load/store).
template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

// One output row of occlude, pack by pack: packs first, first + step, ... < end (pack p holds
// columns p*V .. p*V+V-1). Each is the image's, with the baseline (base_row's pack, or b0
// where base_row is null) in the columns of the window if the row crosses it. src, dst and
// base_row must be aligned to a pack.
template <int V, typename T>
CNNVIZ_HOST_DEVICE inline void occlude_row(
    const Window& win, bool row_in, const T* src, const T* base_row, T b0, T* dst,
    int64_t first, int64_t end, int64_t step) {
  using P = Pack<T, V>;
  const P* src_packs = reinterpret_cast<const P*>(src);
  P* dst_packs = reinterpret_cast<P*>(dst);
  for (int64_t p = first; p < end; p += step) {
    P x = src_packs[p];
    const int64_t x0 = p * V;
    if (row_in && x0 < win.c1 && x0 + V > win.c0) {
      P b;
      if (base_row != nullptr) {
        b = reinterpret_cast<const P*>(base_row)[p];
      } else {
        for (int j = 0; j < V; ++j) {
          b.v[j] = b0;
        }
      }
      for (int j = 0; j < V; ++j) {
        x.v[j] = select(col_inside(win, x0 + j), x.v[j], b.v[j]);
      }
    }
    dst_packs[p] = x;
  }
}

// Number of windows i in [0, n) with i*s <= h < i*s + k (the grid is separable, so the
// cover count of pixel (h, w) is cover_count_1d(h, ...) * cover_count_1d(w, ...)).
CNNVIZ_HOST_DEVICE inline int64_t cover_count_1d(int64_t h, int64_t k, int64_t s, int64_t n) {
  const int64_t hi = h / s < n - 1 ? h / s : n - 1;
  const int64_t lo = h >= k ? (h - k) / s + 1 : 0;
  return hi >= lo ? hi - lo + 1 : 0;
}

template <typename acc_t>
CNNVIZ_HOST_DEVICE inline acc_t inverse_count(int64_t count) {
  return count > 0 ? acc_t(1) / static_cast<acc_t>(count) : acc_t(0);
}

// 2-D difference array of row pitch W1 = W + 1: adding `delta` on the rectangle
// [r0, r1) x [c0, c1) is +delta at (r0, c0) and (r1, c1), -delta at (r0, c1) and (r1, c0).
// corner k in 0..3: index written to *index, returns the sign (+1 / -1).
CNNVIZ_HOST_DEVICE inline int corner(const Window& w, int64_t W1, int k, int64_t* index) {
  const int64_t r = (k & 2) ? w.r1 : w.r0;
  const int64_t c = (k & 1) ? w.c1 : w.c0;
  *index = r * W1 + c;
  return (k == 0 || k == 3) ? 1 : -1;
}

} // namespace occlusion
} // namespace cnnviz
