// fp32 attention on a CPU with AVX2 + FMA (no AVX-512), built and loaded by cpu_attention_fp32.py.
//
// Per head and block of query rows (bm, a multiple of 6): S = q k^T for all keys in 6x16 register tiles against k^T
// laid out once per call in 16-key panels (the row max kept as the tiles are stored; padding keys masked out of
// it); p = 2^(c (S - max)), c = scale * log2(e), in place, with its row sums (exponent bits times a degree-5
// polynomial; S - max before the scale, as SDPA: sharp logits keep their precision); O = p v over chunks of kc keys (p and v's chunk in L1; v laid out once per call in 16-column
// panels), each chunk's sums added to O (sums over kc keys, not one running sum over all keys: SDPA's error,
// not 3x it); out = O / sum, written through the caller's strides. PyTorch's flash kernel calls MKL's GEMM per
// block and a separate softmax; here the GEMMs are this file's micro-kernels, with the max folded into the first.
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cfloat>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "cpu_exp2.h"

namespace {

constexpr int MR = 6;
constexpr int NR = 16;
constexpr int64_t MAX_BM = 240;

inline float* alloc_floats(int64_t n) {  // 64-byte aligned, size rounded up as aligned_alloc wants
  return static_cast<float*>(std::aligned_alloc(64, ((n * sizeof(float) + 63) / 64) * 64));
}

inline __m256 exp2_neg(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-126.0f));
  const __m256 xi = _mm256_floor_ps(x);
  const __m256 f = _mm256_sub_ps(x, xi);
  namespace k = fastsd_exp2;
  __m256 p = _mm256_set1_ps(k::C5);
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(k::C4));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(k::C3));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(k::C2));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(k::C1));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(k::C0));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(xi), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

inline float hmax(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
  return _mm_cvtss_f32(m);
}

inline float hsum(__m256 v) {
  __m128 m = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_add_ps(m, _mm_movehl_ps(m, m));
  m = _mm_add_ss(m, _mm_shuffle_ps(m, m, 1));
  return _mm_cvtss_f32(m);
}

// S tile: R rows of q (ldq) x 16 keys from the packed panel kp (d-major, 16 wide); valid keys `nk` (<16: the rest
// masked out of the max), row maxima updated in rmax[R]
template <int R>
inline void qk_tile(const float* q, int64_t ldq, const float* kp, int d, float* s, int64_t lds, int nk,
                    __m256* rmax) {
  __m256 c0[R], c1[R];
  for (int r = 0; r < R; ++r) c0[r] = c1[r] = _mm256_setzero_ps();
  for (int k = 0; k < d; ++k) {
    const __m256 b0 = _mm256_load_ps(kp + k * NR), b1 = _mm256_load_ps(kp + k * NR + 8);
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r) {
      const __m256 a = _mm256_broadcast_ss(q + r * ldq + k);
      c0[r] = _mm256_fmadd_ps(a, b0, c0[r]);
      c1[r] = _mm256_fmadd_ps(a, b1, c1[r]);
    }
  }
  if (nk < NR) {
    alignas(32) int32_t lane[16];
    for (int i = 0; i < 16; ++i) lane[i] = i < nk ? -1 : 0;
    const __m256 m0 = _mm256_castsi256_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(lane)));
    const __m256 m1 = _mm256_castsi256_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(lane + 8)));
    const __m256 ninf = _mm256_set1_ps(-FLT_MAX);
    for (int r = 0; r < R; ++r) {
      c0[r] = _mm256_blendv_ps(ninf, c0[r], m0);
      c1[r] = _mm256_blendv_ps(ninf, c1[r], m1);
    }
  }
  for (int r = 0; r < R; ++r) {
    _mm256_store_ps(s + r * lds, c0[r]);
    _mm256_store_ps(s + r * lds + 8, c1[r]);
    rmax[r] = _mm256_max_ps(rmax[r], _mm256_max_ps(c0[r], c1[r]));
  }
}

// O tile += P (R rows, ldp) x V (kc keys, ldv) for NV vectors of columns from v
template <int R, int NV>
inline void pv_tile(const float* p, int64_t ldp, const float* v, int64_t ldv, int kc, float* o, int64_t ldo) {
  __m256 c[R][NV];  // this chunk's sums, then added to o: sums over kc keys, not one over all keys
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < NV; ++j) c[r][j] = _mm256_setzero_ps();
  for (int k = 0; k < kc; ++k) {
    __m256 b[NV];
    for (int j = 0; j < NV; ++j) b[j] = _mm256_loadu_ps(v + k * ldv + j * 8);
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r) {
      const __m256 a = _mm256_broadcast_ss(p + r * ldp + k);
      for (int j = 0; j < NV; ++j) c[r][j] = _mm256_fmadd_ps(a, b[j], c[r][j]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < NV; ++j)
      _mm256_storeu_ps(o + r * ldo + j * 8, _mm256_add_ps(_mm256_loadu_ps(o + r * ldo + j * 8), c[r][j]));
}

template <int R>
inline void qk_rows(const float* q, int64_t ldq, const float* kp, int d, int64_t lk, float* s, int64_t lds,
                    float* mx) {
  __m256 rmax[R];
  for (int r = 0; r < R; ++r) rmax[r] = _mm256_set1_ps(-FLT_MAX);
  const int64_t panels = (lk + NR - 1) / NR;
  for (int64_t pnl = 0; pnl < panels; ++pnl) {
    const int nk = static_cast<int>(std::min<int64_t>(NR, lk - pnl * NR));
    qk_tile<R>(q, ldq, kp + pnl * d * NR, d, s + pnl * NR, lds, nk, rmax);
  }
  for (int r = 0; r < R; ++r) mx[r] = hmax(rmax[r]);
}

// vp: v packed per head as column panels, panel at column j (16 wide, the last 8 when d % 16) = [lk][w]
template <int R>
inline void pv_rows(const float* p, int64_t ldp, const float* vp, int64_t lk, int64_t k0, int kc, int d, float* o,
                    int64_t ldo) {
  int j = 0;
  for (; j + 16 <= d; j += 16) pv_tile<R, 2>(p + k0, ldp, vp + j * lk + k0 * 16, 16, kc, o + j, ldo);
  for (; j + 8 <= d; j += 8) pv_tile<R, 1>(p + k0, ldp, vp + j * lk + k0 * 8, 8, kc, o + j, ldo);
}

}  // namespace

extern "C" int fastsd_attention_fp32(const float* q, int64_t qb, int64_t qh, int64_t ql, const float* k, int64_t kb, int64_t kh,
                         int64_t kl, const float* v, int64_t vb, int64_t vh, int64_t vl, float* out, int64_t ob,
                         int64_t oh, int64_t ol, int64_t b, int64_t h, int64_t lq, int64_t lk, int64_t d, float scale,
                         int64_t bm, int64_t kc, int threads) {
  if (d % 8 != 0 || d < 8 || bm % MR != 0 || bm < MR || bm > MAX_BM || kc < 1 || lk < 1) return 1;
  if (b * h == 0 || lq == 0) return 0;  // nothing to compute
  const int64_t n = b * h, panels = (lk + NR - 1) / NR;
  const int64_t lds = panels * NR;  // scores row stride
  float* kp = alloc_floats(n * panels * d * NR);
  float* vpk = alloc_floats(n * lk * d);
  if (!kp || !vpk) {
    std::free(kp);
    std::free(vpk);
    return 2;
  }
  int failed = 0;
  const float c = scale * 1.4426950408889634f;
#pragma omp parallel num_threads(threads)
  {
#pragma omp for schedule(static)
    for (int64_t item = 0; item < n * panels; ++item) {  // k^T in 16-key panels, d-major, zero-padded
      const int64_t i = item / panels, pnl = item % panels;
      const float* kk = k + (i / h) * kb + (i % h) * kh;
      float* dst = kp + (i * panels + pnl) * d * NR;
      for (int64_t key = 0; key < NR; ++key) {
        const int64_t kr = pnl * NR + key;
        for (int64_t x = 0; x < d; ++x) dst[x * NR + key] = kr < lk ? kk[kr * kl + x] : 0.0f;
      }
    }
#pragma omp for schedule(static)
    for (int64_t i = 0; i < n; ++i) {  // v in column panels
      const float* vv = v + (i / h) * vb + (i % h) * vh;
      float* dst = vpk + i * lk * d;
      int64_t j = 0;
      for (; j + 16 <= d; j += 16)
        for (int64_t key = 0; key < lk; ++key) std::memcpy(dst + j * lk + key * 16, vv + key * vl + j, 64);
      for (; j + 8 <= d; j += 8)
        for (int64_t key = 0; key < lk; ++key) std::memcpy(dst + j * lk + key * 8, vv + key * vl + j, 32);
    }
    float* s = alloc_floats(bm * lds);
    float* qs = alloc_floats(bm * d);
    float* o = alloc_floats(bm * d);
    if (!s || !qs || !o) {
#pragma omp atomic write
      failed = 1;
    }
    float mx[MR], sum[MAX_BM];
    const int64_t blocks = (lq + bm - 1) / bm;
#pragma omp for schedule(static)
    for (int64_t item = 0; item < n * blocks; ++item) {
      if (!s || !qs || !o) continue;
      const int64_t i = item / blocks, r0 = (item % blocks) * bm, rows = std::min(bm, lq - r0);
      const float* qq = q + (i / h) * qb + (i % h) * qh + r0 * ql;
      const float* kpi = kp + i * panels * d * NR;
      const float* vpi = vpk + i * lk * d;
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t x = 0; x < d; ++x) qs[r * d + x] = qq[r * ql + x];
      // scores, exp2 and sums per group of MR rows
      for (int64_t g = 0; g < rows; g += MR) {
        const int R = static_cast<int>(std::min<int64_t>(MR, rows - g));
        float* sg = s + g * lds;
        switch (R) {
          case 6: qk_rows<6>(qs + g * d, d, kpi, d, lk, sg, lds, mx); break;
          case 5: qk_rows<5>(qs + g * d, d, kpi, d, lk, sg, lds, mx); break;
          case 4: qk_rows<4>(qs + g * d, d, kpi, d, lk, sg, lds, mx); break;
          case 3: qk_rows<3>(qs + g * d, d, kpi, d, lk, sg, lds, mx); break;
          case 2: qk_rows<2>(qs + g * d, d, kpi, d, lk, sg, lds, mx); break;
          default: qk_rows<1>(qs + g * d, d, kpi, d, lk, sg, lds, mx); break;
        }
        for (int r = 0; r < R; ++r) {
          float* sr = sg + r * lds;
          const __m256 m = _mm256_set1_ps(mx[r]), cv = _mm256_set1_ps(c);
          __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
          int64_t x = 0;
          const int64_t width = panels * NR;
          for (; x + 16 <= width; x += 16) {
            const __m256 p0 = exp2_neg(_mm256_mul_ps(_mm256_sub_ps(_mm256_load_ps(sr + x), m), cv));
            const __m256 p1 = exp2_neg(_mm256_mul_ps(_mm256_sub_ps(_mm256_load_ps(sr + x + 8), m), cv));
            _mm256_store_ps(sr + x, p0);
            _mm256_store_ps(sr + x + 8, p1);
            a0 = _mm256_add_ps(a0, p0);
            a1 = _mm256_add_ps(a1, p1);
          }
          float tot = hsum(_mm256_add_ps(a0, a1));
          // masked keys were -FLT_MAX: exp2 clamps at -126, 2^-126 each; remove them from the sum and zero them
          for (int64_t y = lk; y < width; ++y) { tot -= sr[y]; sr[y] = 0.0f; }
          sum[g + r] = tot;
        }
      }
      std::memset(o, 0, sizeof(float) * rows * d);
      for (int64_t k0 = 0; k0 < lk; k0 += kc) {
        const int kk = static_cast<int>(std::min(kc, lk - k0));
        for (int64_t g = 0; g < rows; g += MR) {
          const int R = static_cast<int>(std::min<int64_t>(MR, rows - g));
          const float* pg = s + g * lds;
          switch (R) {
            case 6: pv_rows<6>(pg, lds, vpi, lk, k0, kk, d, o + g * d, d); break;
            case 5: pv_rows<5>(pg, lds, vpi, lk, k0, kk, d, o + g * d, d); break;
            case 4: pv_rows<4>(pg, lds, vpi, lk, k0, kk, d, o + g * d, d); break;
            case 3: pv_rows<3>(pg, lds, vpi, lk, k0, kk, d, o + g * d, d); break;
            case 2: pv_rows<2>(pg, lds, vpi, lk, k0, kk, d, o + g * d, d); break;
            default: pv_rows<1>(pg, lds, vpi, lk, k0, kk, d, o + g * d, d); break;
          }
        }
      }
      float* oo = out + (i / h) * ob + (i % h) * oh + r0 * ol;
      for (int64_t r = 0; r < rows; ++r) {
        const float inv = 1.0f / sum[r];
        for (int64_t x = 0; x < d; ++x) oo[r * ol + x] = o[r * d + x] * inv;
      }
    }
    std::free(s);
    std::free(qs);
    std::free(o);
  }
  std::free(kp);
  std::free(vpk);
  return failed ? 2 : 0;
}
