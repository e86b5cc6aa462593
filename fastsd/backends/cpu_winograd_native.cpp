// Winograd's input and output transforms (cpu_winograd.py) as one pass each over the data, built and loaded by
// cpu_winograd_native.py.
//
// Input: each a x a tile d of the NHWC input (zero beyond it: padding 1) goes to B^T d B, written as
// t[position][tile][channel], the batched GEMM's operand (the transformed rows i0..i0+ni only: the caller may
// split the positions to bound t's size). Output: each tile's a x a products P (prod[position][tile][channel])
// go to A^T P A plus the bias, written into the NHWC output, the border's extra rows and columns dropped. Both
// separable (two passes of a small matrix) over a block of channels at a time, in L1; the matrices written out
// below (`Transforms`), checked against the Python ones by the self-test.
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace {

constexpr int64_t CB = 64;  // channels per block: a tile's block (a*a*CB floats, twice) stays in L1

inline float fmadd(float a, float b, float c) {  // a * b + c, one rounding where the CPU has FMA
#ifdef __FMA__
  return __builtin_fmaf(a, b, c);
#else
  return a * b + c;
#endif
}

// The transforms along one index: n values s[0], s[ss], .. -> d[0], d[ds], .., each a block of cb channels.
// The matrices of cpu_winograd.py (F4 = "winograd", F2 = "winograd2") written out, their zeros and common terms
// skipped; the self-test holds them to the torch-ops transforms, which use those matrices.
template <int A>
struct Transforms;

template <>
struct Transforms<6> {  // B^T (6x6) and A^T (4x6) of F(4x4, 3x3)
  static void input(const float* s, int64_t ss, float* d, int64_t ds, int64_t cb) {
#pragma omp simd
    for (int64_t c = 0; c < cb; ++c) {
      const float d0 = s[c], d1 = s[ss + c], d2 = s[2 * ss + c], d3 = s[3 * ss + c], d4 = s[4 * ss + c],
                  d5 = s[5 * ss + c];
      const float t1 = fmadd(-4.0f, d2, d4), t2 = fmadd(-4.0f, d1, d3);  // d4 - 4 d2, d3 - 4 d1
      const float t3 = d4 - d2, t4 = 2.0f * (d3 - d1);
      d[c] = fmadd(-5.0f, d2, fmadd(4.0f, d0, d4));  // 4 d0 - 5 d2 + d4
      d[ds + c] = t1 + t2;
      d[2 * ds + c] = t1 - t2;
      d[3 * ds + c] = t3 + t4;
      d[4 * ds + c] = t3 - t4;
      d[5 * ds + c] = fmadd(-5.0f, d3, fmadd(4.0f, d1, d5));  // 4 d1 - 5 d3 + d5
    }
  }
  static void output(const float* s, int64_t ss, float* d, int64_t ds, int64_t cb) {
#pragma omp simd
    for (int64_t c = 0; c < cb; ++c) {
      const float p0 = s[c], p1 = s[ss + c], p2 = s[2 * ss + c], p3 = s[3 * ss + c], p4 = s[4 * ss + c],
                  p5 = s[5 * ss + c];
      const float s1 = p1 + p2, d1 = p1 - p2, s2 = p3 + p4, d2 = p3 - p4;
      d[c] = p0 + s1 + s2;
      d[ds + c] = fmadd(2.0f, d2, d1);
      d[2 * ds + c] = fmadd(4.0f, s2, s1);
      d[3 * ds + c] = fmadd(8.0f, d2, d1 + p5);
    }
  }
};

template <>
struct Transforms<4> {  // B^T (4x4) and A^T (2x4) of F(2x2, 3x3)
  static void input(const float* s, int64_t ss, float* d, int64_t ds, int64_t cb) {
#pragma omp simd
    for (int64_t c = 0; c < cb; ++c) {
      const float d0 = s[c], d1 = s[ss + c], d2 = s[2 * ss + c], d3 = s[3 * ss + c];
      d[c] = d0 - d2;
      d[ds + c] = d1 + d2;
      d[2 * ds + c] = d2 - d1;
      d[3 * ds + c] = d1 - d3;
    }
  }
  static void output(const float* s, int64_t ss, float* d, int64_t ds, int64_t cb) {
#pragma omp simd
    for (int64_t c = 0; c < cb; ++c) {
      const float p0 = s[c], p1 = s[ss + c], p2 = s[2 * ss + c], p3 = s[3 * ss + c];
      d[c] = p0 + p1 + p2;
      d[ds + c] = p1 - p2 - p3;
    }
  }
};

// x: (n, h, w, c) with strides sn, sh, sw (channel stride 1); the tiles of tile rows row0..row0+rows, all tw columns
template <int A>
void input(const float* x, int64_t n, int64_t h, int64_t w, int64_t c, int64_t sn, int64_t sh, int64_t sw,
           int64_t tw, int64_t row0, int64_t rows, int i0, int ni, float* t, int threads) {
  constexpr int M = A - 2;
  const int64_t tiles = n * rows * tw, blocks = (c + CB - 1) / CB;
#pragma omp parallel for num_threads(threads) schedule(static)
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
