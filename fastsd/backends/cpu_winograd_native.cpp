// Winograd's input and output transforms (cpu_winograd.py) as one pass each over the data, built and loaded by
// cpu_winograd_native.py.
//
// Input: each a x a tile d of the NHWC input (zero beyond it: padding 1) goes to B^T d B, written as
// t[position][tile][channel], the batched GEMM's operand (the transformed rows i0..i0+ni only: the caller may
// split the positions to bound t's size). Output: each tile's a x a products P (prod[position][tile][channel])
// go to A^T P A plus the bias, written into the NHWC output, the border's extra rows and columns dropped. Both
// separable (two passes of a small matrix) over a block of channels at a time, in L1; the matrices written out
// in cpu_winograd_transforms.h (`Transforms`), checked against the Python ones by the self-test.
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "cpu_winograd_transforms.h"

namespace {

using fastsd_winograd::CB;
using fastsd_winograd::Transforms;

// x: (n, h, w, c) with strides sn, sh, sw (channel stride 1); the tiles of tile rows row0..row0+rows, all tw columns
template <int A>
void input(const float* x, int64_t n, int64_t h, int64_t w, int64_t c, int64_t sn, int64_t sh, int64_t sw,
           int64_t tw, int64_t row0, int64_t rows, int i0, int ni, float* t, int threads) {
  const int64_t tiles = n * rows * tw, blocks = (c + CB - 1) / CB;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t item = 0; item < tiles * blocks; ++item) {
    alignas(64) float d[A * A * CB], u[A * A * CB];
    const int64_t tile = item / blocks, c0 = (item % blocks) * CB, cb = std::min(CB, c - c0);
    const int64_t img = tile / (rows * tw), ty = row0 + (tile / tw) % rows, tx = tile % tw;
    fastsd_winograd::gather_tile<A>(x + img * sn + c0, h, w, sh, sw, ty, tx, cb, d,
                                     [](const float* src, float* dst, int64_t n) { std::memcpy(dst, src, n * 4); });
    for (int j = 0; j < A; ++j) Transforms<A>::input(d + j * CB, A * CB, u + j * CB, A * CB, cb);  // B^T d
    float* dst = t + tile * c + c0;
    for (int i = 0; i < ni; ++i)  // (B^T d) B, its rows i0..i0+ni, into t
      Transforms<A>::input(u + (i0 + i) * A * CB, CB, dst + i * A * tiles * c, tiles * c, cb);
  }
}

// prod: (a*a, tiles, k); out: (n, h, w, k) contiguous; bias: k floats or null
template <int A>
void output(const float* prod, int64_t k, const float* bias, float* out, int64_t n, int64_t h,
            int64_t w, int64_t tw, int64_t row0, int64_t rows, int threads) {
  constexpr int M = A - 2;
  const int64_t tiles = n * rows * tw, blocks = (k + CB - 1) / CB;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t item = 0; item < tiles * blocks; ++item) {
    alignas(64) float p[A * A * CB], u[M * A * CB], y[M * M * CB];
    const int64_t tile = item / blocks, k0 = (item % blocks) * CB, kb = std::min(CB, k - k0);
    const int64_t img = tile / (rows * tw), ty = row0 + (tile / tw) % rows, tx = tile % tw;
    for (int q = 0; q < A * A; ++q) std::memcpy(p + q * CB, prod + (q * tiles + tile) * k + k0, kb * sizeof(float));
    for (int j = 0; j < A; ++j) Transforms<A>::output(p + j * CB, A * CB, u + j * CB, A * CB, kb);  // A^T P
    for (int i = 0; i < M; ++i) Transforms<A>::output(u + i * A * CB, CB, y + i * M * CB, CB, kb);  // (A^T P) A
    for (int i = 0; i < M && ty * M + i < h; ++i) {
      for (int j = 0; j < M && tx * M + j < w; ++j) {
        float* dst = out + ((img * h + ty * M + i) * w + tx * M + j) * k + k0;
        const float* src = y + (i * M + j) * CB;
        if (bias) {
#pragma omp simd
          for (int64_t c = 0; c < kb; ++c) dst[c] = src[c] + bias[k0 + c];
        } else {
          std::memcpy(dst, src, kb * sizeof(float));
        }
      }
    }
  }
}

}  // namespace

extern "C" {

// 0 on success, 1 for a tile size this library has no code for
int fastsd_winograd_input(int a, const float* x, int64_t n, int64_t h, int64_t w, int64_t c, int64_t sn, int64_t sh,
                          int64_t sw, int64_t tw, int64_t row0, int64_t rows, int64_t i0, int64_t ni,
                          float* t, int threads) {
  if (i0 < 0 || ni < 1 || i0 + ni > a) return 1;
  if (a == 6) input<6>(x, n, h, w, c, sn, sh, sw, tw, row0, rows, i0, ni, t, threads);
  else if (a == 4) input<4>(x, n, h, w, c, sn, sh, sw, tw, row0, rows, i0, ni, t, threads);
  else return 1;
  return 0;
}

int fastsd_winograd_output(int a, const float* prod, int64_t k, const float* bias, float* out,
                           int64_t n, int64_t h, int64_t w, int64_t tw, int64_t row0, int64_t rows, int threads) {
  if (a == 6) output<6>(prod, k, bias, out, n, h, w, tw, row0, rows, threads);
  else if (a == 4) output<4>(prod, k, bias, out, n, h, w, tw, row0, rows, threads);
  else return 1;
  return 0;
}

}  // extern "C"
