// 2^f for f in [0, 1) as a degree-5 polynomial (relative error < 1e-7): the coefficients every native piece's
// exponential uses (scalar here, vectorised by the compiler; the AVX2 and AVX-512 attention kernels evaluate the
// same ones in vector registers).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace fastsd_exp2 {
constexpr float C5 = 1.8775767e-3f, C4 = 8.9893397e-3f, C3 = 5.5826318e-2f, C2 = 2.4015361e-1f, C1 = 6.9315308e-1f,
                C0 = 9.9999994e-1f;

// degree 3 (relative error < 8e-5): for terms rounded to bf16 (8 significant bits) at once
constexpr float B3 = 7.7907167e-2f, B2 = 2.2623320e-1f, B1 = 6.9577712e-1f, B0 = 9.9992782e-1f;

inline float fraction(float f) {
  float p = C5;
  p = p * f + C4;
  p = p * f + C3;
  p = p * f + C2;
  p = p * f + C1;
  return p * f + C0;
}

// e^x, x clamped to +-126 ln 2: 2^floor from the exponent bits times the polynomial for 2^frac
inline float exp_clamped(float x) {
  const float t = std::min(std::max(x * 1.4426950408889634f, -126.f), 126.f);
  const float ti = std::floor(t);
  const int32_t bits = (static_cast<int32_t>(ti) + 127) << 23;
  float s;
  std::memcpy(&s, &bits, 4);
  return fraction(t - ti) * s;
}
}  // namespace fastsd_exp2
