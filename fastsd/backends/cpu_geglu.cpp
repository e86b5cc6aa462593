// GEGLU's elementwise half, h * GELU(gate) with the exact (erf) GELU, fp32 or bf16 in and out, built and loaded by
// cpu_geglu.py.
//
// One pass over the projection's output p = [h | gate] (each row: n values of h, then n of gate), writing
// out = h * GELU(gate) once, where PyTorch's F.gelu writes GELU(gate) and the multiply reads it again. GELU(x) =
// x/2 (1 + erf(x / sqrt 2)) with erfc(z) = t P(t) e^(-z^2), t = 1 / (1 + p z), z = |x| / sqrt 2 (Abramowitz &
// Stegun 7.1.26, |error| < 1.5e-7: the form PyTorch's vectorised erf takes): 1 + erf = 2 - erfc for x >= 0 and
// erfc itself below, no cancellation there.
#include <omp.h>

#include <cmath>
#include <cstdint>

#include "cpu_elem.h"
#include "cpu_exp2.h"

namespace {

inline float gelu(float x) {
  const float z = std::fabs(x) * 0.70710678118654752f;
  const float t = 1.0f / (1.0f + 0.3275911f * z);
  const float poly = t * (0.254829592f + t * (-0.284496736f + t * (1.421413741f + t * (-1.453152027f + t * 1.061405429f))));
  const float erfc = poly * fastsd_exp2::exp_clamped(-z * z);
  return 0.5f * x * (x >= 0.0f ? 2.0f - erfc : erfc);
}

constexpr int64_t COLS = 1024;  // columns per work item: rows split across threads in blocks of this width

template <typename T>
void geglu(const T* p, int64_t rows, int64_t n, int64_t ldp, T* out, int64_t ldo, int threads) {
  const int64_t blocks = (n + COLS - 1) / COLS;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t item = 0; item < rows * blocks; ++item) {
    const int64_t r = item / blocks, j0 = (item % blocks) * COLS, j1 = std::min(n, j0 + COLS);
    const T* h = p + r * ldp;
    const T* g = h + n;
    T* o = out + r * ldo;
#pragma omp simd
    for (int64_t j = j0; j < j1; ++j) store(o, j, load(h, j) * gelu(load(g, j)));
  }
}

}  // namespace

// bf16: 0 = fp32, 1 = bf16 (uint16_t bits). p: rows x 2n (row stride ldp), out: rows x n (row stride ldo).
// 0 on success, 1 for arguments it has no code for.
extern "C" int fastsd_geglu(int bf16, const void* p, int64_t rows, int64_t n, int64_t ldp, void* out, int64_t ldo,
                            int threads) {
  if (rows < 0 || n < 0 || ldp < 2 * n || ldo < n) return 1;
  if (bf16)
    geglu(static_cast<const uint16_t*>(p), rows, n, ldp, static_cast<uint16_t*>(out), ldo, threads);
  else
    geglu(static_cast<const float*>(p), rows, n, ldp, static_cast<float*>(out), ldo, threads);
  return 0;
}
