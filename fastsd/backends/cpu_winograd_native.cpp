// Winograd's input and output transforms (cpu_winograd.py) as one pass each over the data, built and loaded by
// cpu_winograd_native.py.
//
// Input: each a x a tile d of the NHWC input (zero beyond it: padding 1) goes to B^T d B, written as
// t[position][tile][channel], the batched GEMM's operand (the transformed rows i0..i0+ni only: the caller may
// split the positions to bound t's size). Output: each tile's a x a products P (prod[position][tile][channel])
// go to A^T P A plus the bias, written into the NHWC output, the border's extra rows and columns dropped. Both
// separable (two passes of a small matrix) over a block of channels at a time, in L1; the matrices come from
// Python (the one place they are written down), their zero entries skipped.
#include <omp.h>
#ifdef __AVX__
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace {

constexpr int64_t CB = 64;  // channels per block: a tile's block (a*a*CB floats, twice) stays in L1

// dst[i][j] = sum_k mat[(r0 + i) * K + k] * src[k][j] for i < rows, j < COLS: a pass along the first index
// (rows r0.. of `mat`); each entry a block of cb channels
template <int K, int COLS>
inline void first_pass(const float* mat, int r0, int rows, const float* src, float* dst, int64_t cb) {
  for (int i = 0; i < rows; ++i) {
    for (int j = 0; j < COLS; ++j) {
      float* d = dst + (i * COLS + j) * CB;
      std::fill(d, d + cb, 0.0f);
      for (int k = 0; k < K; ++k) {
        const float b = mat[(r0 + i) * K + k];
        if (b == 0.0f) continue;
        const float* s = src + (k * COLS + j) * CB;
#pragma omp simd
        for (int64_t c = 0; c < cb; ++c) d[c] += b * s[c];
      }
    }
  }
}

// dst[i][j] = sum_k mat[j * K + k] * src[i][k] for i < rows, j < COLS: the pass along the second index
template <int K, int COLS>
inline void second_pass(const float* mat, int rows, const float* src, float* dst, int64_t cb) {
  for (int i = 0; i < rows; ++i) {
    for (int j = 0; j < COLS; ++j) {
      float* d = dst + (i * COLS + j) * CB;
      std::fill(d, d + cb, 0.0f);
      for (int k = 0; k < K; ++k) {
        const float b = mat[j * K + k];
        if (b == 0.0f) continue;
        const float* s = src + (i * K + k) * CB;
#pragma omp simd
        for (int64_t c = 0; c < cb; ++c) d[c] += b * s[c];
      }
    }
  }
}

// x: (n, h, w, c) with strides sn, sh, sw (channel stride 1); the tiles of tile rows row0..row0+rows, all tw columns
template <int A>
void input(const float* x, int64_t n, int64_t h, int64_t w, int64_t c, int64_t sn, int64_t sh, int64_t sw,
           const float* bt, int64_t tw, int64_t row0, int64_t rows, int i0, int ni, float* t, int threads) {
  constexpr int M = A - 2;
  const int64_t tiles = n * rows * tw, blocks = (c + CB - 1) / CB;
#pragma omp parallel num_threads(threads)
  {
#pragma omp for schedule(static)
    for (int64_t item = 0; item < tiles * blocks; ++item) {
      alignas(64) float d[A * A * CB], u[A * A * CB];
      const int64_t tile = item / blocks, c0 = (item % blocks) * CB, cb = std::min(CB, c - c0);
      const int64_t img = tile / (rows * tw), ty = row0 + (tile / tw) % rows, tx = tile % tw;
      for (int i = 0; i < A; ++i) {
        const int64_t y = ty * M - 1 + i;
        for (int j = 0; j < A; ++j) {
          const int64_t xx = tx * M - 1 + j;
          float* dst = d + (i * A + j) * CB;
          if (y < 0 || y >= h || xx < 0 || xx >= w) {
            std::fill(dst, dst + cb, 0.0f);
          } else {
            std::memcpy(dst, x + img * sn + y * sh + xx * sw + c0, cb * sizeof(float));
          }
        }
      }
      first_pass<A, A>(bt, i0, ni, d, u, cb);  // B^T d, rows i0..
      second_pass<A, A>(bt, ni, u, d, cb);     // (B^T d) B
      float* dst = t + tile * c + c0;
#ifdef __AVX__
      if (cb == CB && (reinterpret_cast<uintptr_t>(dst) & 31) == 0 && (tiles * c) % 8 == 0) {
        for (int p = 0; p < ni * A; ++p)  // past the cache: only the GEMM reads t, after all of it is written
          for (int64_t q = 0; q < CB; q += 8) _mm256_stream_ps(dst + p * tiles * c + q, _mm256_load_ps(d + p * CB + q));
        continue;
      }
#endif
      for (int p = 0; p < ni * A; ++p) std::memcpy(dst + p * tiles * c, d + p * CB, cb * sizeof(float));
    }
#ifdef __AVX__
    _mm_sfence();  // this thread's streamed stores done before another thread's GEMM reads them
#endif
  }
}

// prod: (a*a, tiles, k); out: (n, h, w, k) contiguous; bias: k floats or null
template <int A>
void output(const float* prod, int64_t k, const float* at, const float* bias, float* out, int64_t n, int64_t h,
            int64_t w, int64_t tw, int64_t row0, int64_t rows, int threads) {
  constexpr int M = A - 2;
  const int64_t tiles = n * rows * tw, blocks = (k + CB - 1) / CB;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t item = 0; item < tiles * blocks; ++item) {
    alignas(64) float p[A * A * CB], u[M * A * CB], y[M * M * CB];
    const int64_t tile = item / blocks, k0 = (item % blocks) * CB, kb = std::min(CB, k - k0);
    const int64_t img = tile / (rows * tw), ty = row0 + (tile / tw) % rows, tx = tile % tw;
    for (int q = 0; q < A * A; ++q) std::memcpy(p + q * CB, prod + (q * tiles + tile) * k + k0, kb * sizeof(float));
    first_pass<A, A>(at, 0, M, p, u, kb);  // A^T P
    second_pass<A, M>(at, M, u, y, kb);    // (A^T P) A
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
                          int64_t sw, const float* bt, int64_t tw, int64_t row0, int64_t rows, int64_t i0, int64_t ni,
                          float* t, int threads) {
  if (i0 < 0 || ni < 1 || i0 + ni > a) return 1;
  if (a == 6) input<6>(x, n, h, w, c, sn, sh, sw, bt, tw, row0, rows, i0, ni, t, threads);
  else if (a == 4) input<4>(x, n, h, w, c, sn, sh, sw, bt, tw, row0, rows, i0, ni, t, threads);
  else return 1;
  return 0;
}

int fastsd_winograd_output(int a, const float* prod, int64_t k, const float* at, const float* bias, float* out,
                           int64_t n, int64_t h, int64_t w, int64_t tw, int64_t row0, int64_t rows, int threads) {
  if (a == 6) output<6>(prod, k, at, bias, out, n, h, w, tw, row0, rows, threads);
  else if (a == 4) output<4>(prod, k, at, bias, out, n, h, w, tw, row0, rows, threads);
  else return 1;
  return 0;
}

}  // extern "C"
