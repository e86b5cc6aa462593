// fp32 attention on a CPU with AVX-512 or AVX2 + FMA (the same code over 16- or 8-float vectors: cpu_vec.h; compiled
// once per ISA), built and loaded by cpu_attention_fp32.py.
//
// Transposed: per head and block of BQ queries (AVX-512 48, AVX2 24), S^T = k q^T (keys x queries) in RK x BQ register
// tiles (RK keys broadcast against 3 vectors of queries: q^T laid out per block), so each query's max over the keys
// is an elementwise max of the tiles, kept as they are stored. Then per chunk of kc keys (its p in L1):
// p = 2^(c (S - max)), c = scale * log2(e), in place (exponent bits times a degree-5 polynomial, floored at 2^-64
// as the brgemm kernel), the chunk's sums, and O^T (d x BQ) += v^T p^T over the chunk in RD x BQ tiles (RD head-dim
// rows broadcast from v against p^T's rows), each chunk's products summed apart and added to O^T (SDPA's error;
// one running sum over all keys tripled it). out = O / sum, transposed back through the caller's strides. Against
// the brgemm kernel (cpu_attention_native.cpp) and the row-major micro-kernel this replaced on AVX2: no separate max
// or exponential pass over the whole score block, and p v not padded (a head dim of 40 is 48 in brgemm's).
// k and v are copied per head into contiguous rows once per call; the head dim must be a multiple of 8.
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cfloat>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "cpu_exp2.h"
#include "cpu_vec.h"

namespace {

using namespace fastsd_vec;

#if defined(__AVX512F__)
constexpr int RK = 8;  // keys per q k^T tile (3 x 8 accumulators of the 32 registers; other shapes: docs/cpu-path.md)
constexpr int RD = 8;  // head-dim rows per p v tile
#else
constexpr int RK = 4;  // 3 x 4 accumulators of the 16 registers
constexpr int RD = 4;
#endif

constexpr int QV = 3;        // vectors of queries per block
constexpr int BQ = W * QV;   // queries per block: the only block size (bm) this takes

inline float* alloc_floats(int64_t n) {  // 64-byte aligned, size rounded up as aligned_alloc wants
  return static_cast<float*>(std::aligned_alloc(64, ((n * sizeof(float) + 63) / 64) * 64));
}

// c[r][j] += sum over t < n of a[r * a_row + t * a_step] * b[t * BQ + W * j]: R rows of a broadcast against the
// QV vectors of a row of b, for both GEMMs (q k^T: a = k's rows, b = q^T; p v: a = v^T read from v's rows, b = p)
template <int R>
inline void accumulate(const float* a, int64_t a_row, int64_t a_step, const float* b, int n, Vec (&c)[R][QV]) {
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < QV; ++j) c[r][j] = vzero();
  for (int t = 0; t < n; ++t) {
    Vec bv[QV];
    for (int j = 0; j < QV; ++j) bv[j] = vload(b + t * BQ + W * j);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const Vec av = vset1(a[r * a_row + t * a_step]);
      for (int j = 0; j < QV; ++j) c[r][j] = vfma(av, bv[j], c[r][j]);
    }
  }
}

// S^T rows: R keys (kr, row stride d) x BQ queries (qt: [d][BQ]); column maxima updated in mx
template <int R>
inline void qk_tile(const float* kr, int d, const float* qt, float* s, Vec* mx) {
  Vec c[R][QV];
  accumulate<R>(kr, d, 1, qt, d, c);
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < QV; ++j) {
      vstore(s + r * BQ + W * j, c[r][j]);
      mx[j] = vmax(mx[j], c[r][j]);
    }
}

// the last n < RK keys as one tile of n rows (none when n is 0)
template <int R>
inline void qk_tail(int n, const float* kr, int d, const float* qt, float* s, Vec* mx) {
  if constexpr (R > 0) {
    if (n == R) return qk_tile<R>(kr, d, qt, s, mx);
    qk_tail<R - 1>(n, kr, d, qt, s, mx);
  }
}

// O^T rows (RD of the head dim, ot row stride BQ) += v^T (kc keys from vr, row stride d) p^T (kc rows of BQ)
inline void pv_tile(const float* p, const float* vr, int d, int kc, float* ot) {
  Vec c[RD][QV];
  accumulate<RD>(vr, 1, d, p, kc, c);
  for (int r = 0; r < RD; ++r)
    for (int j = 0; j < QV; ++j)
      vstore(ot + r * BQ + W * j, vadd(vload(ot + r * BQ + W * j), c[r][j]));
}

}  // namespace

extern "C" int fastsd_attention_fp32(const float* q, int64_t qb, int64_t qh, int64_t ql, const float* k, int64_t kb,
                                     int64_t kh, int64_t kl, const float* v, int64_t vb, int64_t vh, int64_t vl,
                                     float* out, int64_t ob, int64_t oh, int64_t ol, int64_t b, int64_t h, int64_t lq,
                                     int64_t lk, int64_t d, float scale, int64_t bm, int64_t kc, int threads) {
  if (d % 8 != 0 || d < 8 || bm != BQ || kc < 1 || lk < 1) return 1;  // d % 8: RD divides it
  if (b * h == 0 || lq == 0) return 0;
  const int64_t n = b * h;
  float* kp = alloc_floats(n * lk * d);
  float* vp = alloc_floats(n * lk * d);
  if (!kp || !vp) {
    std::free(kp);
    std::free(vp);
    return 2;
  }
  int failed = 0;
  const float c = scale * 1.4426950408889634f;
#pragma omp parallel num_threads(threads)
  {
#pragma omp for schedule(static)
    for (int64_t i = 0; i < n; ++i) {  // k and v per head, rows contiguous
      const float* kk = k + (i / h) * kb + (i % h) * kh;
      const float* vv = v + (i / h) * vb + (i % h) * vh;
      for (int64_t key = 0; key < lk; ++key) {
        std::memcpy(kp + (i * lk + key) * d, kk + key * kl, d * sizeof(float));
        std::memcpy(vp + (i * lk + key) * d, vv + key * vl, d * sizeof(float));
      }
    }
    float* s = alloc_floats(lk * BQ);
    float* qt = alloc_floats(d * BQ);
    float* ot = alloc_floats(d * BQ);
    if (!s || !qt || !ot) {
#pragma omp atomic write
      failed = 1;
    }
    alignas(64) float sums[BQ];
    const int64_t blocks = (lq + BQ - 1) / BQ;
#pragma omp for schedule(static)
    for (int64_t item = 0; item < n * blocks; ++item) {
      if (!s || !qt || !ot) continue;
      const int64_t i = item / blocks, r0 = (item % blocks) * BQ, rows = std::min<int64_t>(BQ, lq - r0);
      const float* qq = q + (i / h) * qb + (i % h) * qh + r0 * ql;
      const float* kpi = kp + i * lk * d;
      const float* vpi = vp + i * lk * d;
      for (int64_t x = 0; x < d; ++x) {
        for (int64_t r = 0; r < rows; ++r) qt[x * BQ + r] = qq[r * ql + x];
        for (int64_t r = rows; r < BQ; ++r) qt[x * BQ + r] = 0.0f;
      }
      Vec mx[QV];
      for (int j = 0; j < QV; ++j) mx[j] = vset1(-FLT_MAX);
      int64_t k0 = 0;
      for (; k0 + RK <= lk; k0 += RK) qk_tile<RK>(kpi + k0 * d, d, qt, s + k0 * BQ, mx);
      qk_tail<RK - 1>(static_cast<int>(lk - k0), kpi + k0 * d, d, qt, s + k0 * BQ, mx);  // the last lk % RK keys
      std::memset(ot, 0, sizeof(float) * d * BQ);
      const Vec vc = vset1(c), lo = vset1(-64.f);
      Vec tot[QV];
      for (int j = 0; j < QV; ++j) tot[j] = vzero();
      for (int64_t c0 = 0; c0 < lk; c0 += kc) {
        const int kk = static_cast<int>(std::min(kc, lk - c0));
        Vec cs[QV];
        for (int j = 0; j < QV; ++j) cs[j] = vzero();
        float* sc = s + c0 * BQ;
        for (int key = 0; key < kk; ++key)
          for (int j = 0; j < QV; ++j) {
            float* at = sc + key * BQ + W * j;
            const Vec e = exp2_neg(vmax(vmul(vsub(vload(at), mx[j]), vc), lo));
            vstore(at, e);
            cs[j] = vadd(cs[j], e);
          }
        for (int j = 0; j < QV; ++j) tot[j] = vadd(tot[j], cs[j]);
        for (int64_t dg = 0; dg < d; dg += RD) pv_tile(sc, vpi + c0 * d + dg, static_cast<int>(d), kk, ot + dg * BQ);
      }
      for (int j = 0; j < QV; ++j) vstore(sums + W * j, tot[j]);
      float* oo = out + (i / h) * ob + (i % h) * oh + r0 * ol;
      for (int64_t r = 0; r < rows; ++r) {
        const float inv = 1.0f / sums[r];
        for (int64_t x = 0; x < d; ++x) oo[r * ol + x] = ot[x * BQ + r] * inv;
      }
    }
    std::free(s);
    std::free(qt);
    std::free(ot);
  }
  std::free(kp);
  std::free(vp);
  return failed ? 2 : 0;
}
