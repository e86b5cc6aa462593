// The batched GEMMs of a bf16 layer's Winograd F(2x2) convolution (cpu_winograd.py) with bf16 operands and fp32
// products, built and loaded by cpu_winograd_bf16.py.
//
// prod[p] (M x N, fp32) = bf16(t[p]) (M x C) . u[p] (C x N) for each transformed position p: t, the transformed
// input tiles, in fp32 as the input transform writes them, rounded to bf16 (nearest even) a block of rows at a
// time into a per-thread buffer; u, the transformed weight, already bf16, pair-interleaved along C ("VNNI":
// [C/2][N][2], C padded to even with zeros) as oneDNN's brgemm micro-kernel (ATen's cpublas::brgemm) takes it;
// sums and products in fp32. Work items are (position, block of rows), each running the micro-kernel over blocks
// of columns: a block of t is converted once and read from cache for every block of columns.
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

int gemm(const float* t, const uint16_t* u, float* prod, int64_t positions, int64_t m, int64_t c, int64_t n,
         int64_t block_m, int64_t block_n, int threads, bool cvt) {
  if (positions < 0 || m < 0 || c < 1 || n < 1 || block_m < 1 || block_n < 1 || threads < 1) {
    g_error = "bad arguments";
    return 1;
  }
  const int64_t cp = (c + 1) / 2 * 2;  // the reduction padded to pairs
  const int64_t blocks = (m + block_m - 1) / block_m;
  const auto convert = cvt ? to_bf16_cvt : to_bf16_int;
  const auto make = [&] { return std::vector<uint16_t>(static_cast<size_t>(block_m * cp)); };
  const auto item = [&](int64_t it, std::vector<uint16_t>& a) {
    const int64_t p = it / blocks, r0 = (it % blocks) * block_m, rows = std::min(block_m, m - r0);
    const float* src = t + (p * m + r0) * c;
    for (int64_t r = 0; r < rows; ++r) {
      convert(src + r * c, a.data() + r * cp, c);
      if (cp != c) a[r * cp + c] = 0;
    }
    const uint16_t* up = u + p * cp * n;
    float* dst = prod + (p * m + r0) * n;
    for (int64_t j = 0; j < n; j += block_n) {
      at::native::cpublas::brgemm(rows, std::min(block_n, n - j), cp, cp, n, n, false,
                                  reinterpret_cast<const bf16*>(a.data()),
                                  reinterpret_cast<const bf16*>(up + j * 2), dst + j, true);
    }
  };
  std::string error;
  if (!fastsd_items::run(positions * blocks, threads, true, make, item, error)) {
    g_error = error;
    return 1;
  }
  return 0;
}

}  // namespace

extern "C" const char* fastsd_winograd_bf16_error() { return g_error.c_str(); }

// t (positions, m, c) fp32, u (positions, ceil(c/2), n, 2) bf16, prod (positions, m, n) fp32, all contiguous.
// cvt != 0: the AVX512-BF16 conversion where the CPU has it (0: integer rounding, the same result: for tests).
// Returns 0, or 1 with the reason in fastsd_winograd_bf16_error(); no C++ exception crosses into the caller.
extern "C" int fastsd_winograd_gemm_bf16(const float* t, const uint16_t* u, float* prod, int64_t positions,
                                         int64_t m, int64_t c, int64_t n, int64_t block_m, int64_t block_n,
                                         int threads, int cvt) {
  try {
    return gemm(t, u, prod, positions, m, c, n, block_m, block_n, threads,
                cvt && __builtin_cpu_supports("avx512bf16"));
  } catch (const std::exception& e) {
    g_error = e.what();
    return 1;
  }
}
