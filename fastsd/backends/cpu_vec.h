// One vector type for the ISA a native piece is compiled for (AVX-512: 16 floats; AVX2 + FMA: 8) and the
// operations the attention kernels use, with the vectorised 2^x of cpu_exp2.h (include that first).
#pragma once

#include <immintrin.h>

namespace fastsd_vec {

#if defined(__AVX512F__)
using Vec = __m512;
constexpr int W = 16;  // floats per vector
inline Vec vzero() { return _mm512_setzero_ps(); }
inline Vec vset1(float x) { return _mm512_set1_ps(x); }
inline Vec vload(const float* p) { return _mm512_load_ps(p); }
inline void vstore(float* p, Vec x) { _mm512_store_ps(p, x); }
inline Vec vfma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
inline Vec vadd(Vec a, Vec b) { return _mm512_add_ps(a, b); }
inline Vec vsub(Vec a, Vec b) { return _mm512_sub_ps(a, b); }
inline Vec vmul(Vec a, Vec b) { return _mm512_mul_ps(a, b); }
inline Vec vmax(Vec a, Vec b) { return _mm512_max_ps(a, b); }
inline Vec vfloor(Vec x) { return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC); }
inline Vec vpow2(Vec p, Vec xi) { return _mm512_scalef_ps(p, xi); }  // p * 2^xi
#elif defined(__AVX2__) && defined(__FMA__)
using Vec = __m256;
constexpr int W = 8;
inline Vec vzero() { return _mm256_setzero_ps(); }
inline Vec vset1(float x) { return _mm256_set1_ps(x); }
inline Vec vload(const float* p) { return _mm256_load_ps(p); }
inline void vstore(float* p, Vec x) { _mm256_store_ps(p, x); }
inline Vec vfma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
inline Vec vadd(Vec a, Vec b) { return _mm256_add_ps(a, b); }
inline Vec vsub(Vec a, Vec b) { return _mm256_sub_ps(a, b); }
inline Vec vmul(Vec a, Vec b) { return _mm256_mul_ps(a, b); }
inline Vec vmax(Vec a, Vec b) { return _mm256_max_ps(a, b); }
inline Vec vfloor(Vec x) { return _mm256_floor_ps(x); }
inline Vec vpow2(Vec p, Vec xi) {  // p * 2^xi from the exponent bits (xi in [-64, 0])
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(xi), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}
#else
#error "needs AVX-512 or AVX2 + FMA"
#endif


// 2^x for x in [-64, 0]: 2^floor(x) times the polynomial for 2^frac(x) (cpu_exp2.h)
inline Vec exp2_neg(Vec x) {
  const Vec xi = vfloor(x);
  const Vec f = vsub(x, xi);
  namespace k = fastsd_exp2;
  Vec p = vset1(k::C5);
  p = vfma(p, f, vset1(k::C4));
  p = vfma(p, f, vset1(k::C3));
  p = vfma(p, f, vset1(k::C2));
  p = vfma(p, f, vset1(k::C1));
  p = vfma(p, f, vset1(k::C0));
  return vpow2(p, xi);
}

}  // namespace fastsd_vec
