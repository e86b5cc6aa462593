// Winograd's transforms along one index for cpu_winograd.py's F(4x4, 3x3) and F(2x2, 3x3), over a block of
// channels at a time (included by cpu_winograd_native.cpp, the fp32 transforms, and cpu_winograd_bf16.cpp, the
// bf16 F(2x2) convolution).
#pragma once

#include <algorithm>
#include <cstdint>

namespace fastsd_winograd {

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

// The a x a tile at tile row ty, column tx (output tiles of a - 2; padding 1: zero beyond the image) of cb
// channels into d[(i * A + j) * CB + channel] as floats: x is the image's first channel of the block, sh and sw
// its row and pixel strides; load(src, dst, cb) converts one pixel's channels
template <int A, class T, class Load>
inline void gather_tile(const T* x, int64_t h, int64_t w, int64_t sh, int64_t sw, int64_t ty, int64_t tx,
                        int64_t cb, float* d, Load load) {
  constexpr int M = A - 2;
  for (int i = 0; i < A; ++i) {
    const int64_t y = ty * M - 1 + i;
    for (int j = 0; j < A; ++j) {
      const int64_t xx = tx * M - 1 + j;
      float* dst = d + (i * A + j) * CB;
      if (y < 0 || y >= h || xx < 0 || xx >= w) {
        std::fill(dst, dst + cb, 0.0f);
      } else {
        load(x + y * sh + xx * sw, dst, cb);
      }
    }
  }
}

}  // namespace fastsd_winograd
