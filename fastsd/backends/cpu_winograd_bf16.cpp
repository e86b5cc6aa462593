// A bf16 layer's Winograd F(2x2) convolution (cpu_winograd.py's F2B) in one call, built and loaded by
// cpu_winograd_bf16.py: the input transform in fp32 rounded to bf16 (nearest even), the GEMMs by oneDNN's brgemm
// micro-kernel (ATen's cpublas::brgemm) on bf16 operands with fp32 sums, the output transform plus the bias in
// fp32 rounded to bf16: a block of tiles at a time, its operands and products in cache (no tensor of transformed
// tiles or products in memory). u, the transformed weight, is already bf16: per position, for each block of
// `block_n` output channels (the last one narrower) a contiguous panel [C/2][width][2], pair-interleaved along C
// ("VNNI", C padded to even with zeros) as the micro-kernel takes it.
#include <ATen/native/CPUBlas.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <exception>
#include <string>
#include <vector>

#include "cpu_items.h"
#include "cpu_winograd_transforms.h"

namespace {

using bf16 = at::BFloat16;

thread_local std::string g_error;  // what this thread's last failed call raised (fastsd_winograd_bf16_error)

inline uint16_t round_bf16(float f) {  // nearest even (the values here are finite)
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

// n floats -> bf16, nearest even: AVX512-BF16's conversion (compiled for this function alone, called only where
// the CPU has it) or integer rounding; the same result for finite values
__attribute__((target("avx512f,avx512bf16"))) void to_bf16_cvt(const float* src, uint16_t* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i),
                        reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(_mm512_loadu_ps(src + i))));
  }
  for (; i < n; ++i) dst[i] = round_bf16(src[i]);
}

void to_bf16_int(const float* src, uint16_t* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = round_bf16(src[i]);
}

inline float from_bf16(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// The whole F(2x2) convolution of bf16 NHWC x into bf16 NHWC out, a block of `block_t` tiles at a time: the
// block's input transform (fp32, rounded to bf16 as the GEMMs' operand: v[position][tile][channel]), then per
// block of `block_n` output channels the 16 GEMMs into fp32 products and their output transform plus the bias,
// rounded to bf16 into out: the arithmetic, in the same order, of cpu_winograd_native.cpp's fp32 transforms
// around an fp32 GEMM of the rounded operands. Work items are (block of tiles, group of output channels);
// `groups` splits the channels where there are few blocks of tiles for the threads (each group transforms its
// tiles again). u's panels are `block_n` wide.
int conv(const uint16_t* x, int64_t n, int64_t h, int64_t w, int64_t c, int64_t sn, int64_t sh, int64_t sw,
         const uint16_t* u, int64_t k, const float* bias, uint16_t* out, int64_t block_t, int64_t block_n,
         int64_t groups, int threads, bool cvt) {
  using fastsd_winograd::CB;
  using T = fastsd_winograd::Transforms<4>;
  constexpr int A = 4, M = 2, P = A * A;
  if (n < 1 || h < 1 || w < 1 || c < 1 || k < 1 || block_t < 1 || block_n < 1 || block_n > CB || groups < 1 ||
      threads < 1) {
    g_error = "bad arguments";
    return 1;
  }
  const int64_t th = (h + M - 1) / M, tw = (w + M - 1) / M, tiles = n * th * tw, cp = (c + 1) / 2 * 2;
  const int64_t tblocks = (tiles + block_t - 1) / block_t, nblocks = (k + block_n - 1) / block_n;
  groups = std::min(groups, nblocks);
  const int64_t per_group = (nblocks + groups - 1) / groups * block_n;
  const auto convert = cvt ? to_bf16_cvt : to_bf16_int;
  struct Scratch {
    std::vector<uint16_t> v;
    std::vector<float> prod;
  };
  const auto make = [&] {
    return Scratch{std::vector<uint16_t>(static_cast<size_t>(P * block_t * cp)),
                   std::vector<float>(static_cast<size_t>(P * block_t * block_n))};
  };
  const auto item = [&](int64_t it, Scratch& s) {
    const int64_t t0 = (it / groups) * block_t, rows = std::min(block_t, tiles - t0), g = it % groups;
    const int64_t j_end = std::min(k, (g + 1) * per_group);
    if (g * per_group >= j_end) return;
    alignas(64) float d[P * CB], e[P * CB], f[P * CB];
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t tile = t0 + r, img = tile / (th * tw), ty = (tile / tw) % th, tx = tile % tw;
      for (int64_t c0 = 0; c0 < c; c0 += CB) {
        const int64_t cb = std::min(CB, c - c0);
        fastsd_winograd::gather_tile<A>(x + img * sn + c0, h, w, sh, sw, ty, tx, cb, d,
                                        [](const uint16_t* src, float* dst, int64_t n) {
                                          for (int64_t q = 0; q < n; ++q) dst[q] = from_bf16(src[q]);
                                        });
        for (int j = 0; j < A; ++j) T::input(d + j * CB, A * CB, e + j * CB, A * CB, cb);  // B^T d
        for (int i = 0; i < A; ++i) T::input(e + i * A * CB, CB, f + i * A * CB, CB, cb);  // (B^T d) B
        for (int q = 0; q < P; ++q) convert(f + q * CB, s.v.data() + (q * block_t + r) * cp + c0, cb);
      }
      if (cp != c) {
        for (int q = 0; q < P; ++q) s.v[(q * block_t + r) * cp + c] = 0;
      }
    }
    for (int64_t j0 = g * per_group; j0 < j_end; j0 += block_n) {
      const int64_t nb = std::min(block_n, k - j0);
      for (int q = 0; q < P; ++q) {
        at::native::cpublas::brgemm(rows, nb, cp, cp, nb, nb, false,
                                    reinterpret_cast<const bf16*>(s.v.data() + q * block_t * cp),
                                    reinterpret_cast<const bf16*>(u + (q * k + j0) * cp),
                                    s.prod.data() + q * block_t * nb, true);
      }
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t tile = t0 + r, img = tile / (th * tw), ty = (tile / tw) % th, tx = tile % tw;
        for (int q = 0; q < P; ++q) std::memcpy(d + q * CB, s.prod.data() + (q * block_t + r) * nb, nb * 4);
        for (int j = 0; j < A; ++j) T::output(d + j * CB, A * CB, e + j * CB, A * CB, nb);  // A^T P
        for (int i = 0; i < M; ++i) T::output(e + i * A * CB, CB, f + i * M * CB, CB, nb);  // (A^T P) A
        for (int i = 0; i < M && ty * M + i < h; ++i) {
          for (int j = 0; j < M && tx * M + j < w; ++j) {
            float* y = f + (i * M + j) * CB;
            if (bias) {
              for (int64_t q = 0; q < nb; ++q) y[q] += bias[j0 + q];
            }
            convert(y, out + ((img * h + ty * M + i) * w + tx * M + j) * k + j0, nb);
          }
        }
      }
    }
  };
  std::string error;
  if (!fastsd_items::run(tblocks * groups, threads, true, make, item, error)) {
    g_error = error;
    return 1;
  }
  return 0;
}

}  // namespace

extern "C" const char* fastsd_winograd_bf16_error() { return g_error.c_str(); }

// x (n, h, w, c) bf16 with strides sn, sh, sw (channels contiguous), u (16, 2 ceil(c/2) k) bf16 in panels of
// block_n output channels, bias k floats or null, out (n, h, w, k) bf16 contiguous: out = F(2x2) convolution of x
// by the weight u was transformed from, plus the bias. cvt != 0: AVX512-BF16's conversion where the CPU has it
// (0: integer rounding, the same result: for tests). Returns 0, or 1 with the reason in
// fastsd_winograd_bf16_error(); no C++ exception crosses into the caller.
extern "C" int fastsd_winograd_conv_bf16(const uint16_t* x, int64_t n, int64_t h, int64_t w, int64_t c, int64_t sn,
                                         int64_t sh, int64_t sw, const uint16_t* u, int64_t k, const float* bias,
                                         uint16_t* out, int64_t block_t, int64_t block_n, int64_t groups,
                                         int threads, int cvt) {
  try {
    return conv(x, n, h, w, c, sn, sh, sw, u, k, bias, out, block_t, block_n, groups, threads,
                cvt && __builtin_cpu_supports("avx512bf16"));
  } catch (const std::exception& e) {
    g_error = e.what();
    return 1;
  }
}
