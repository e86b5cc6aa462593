// bf16 (and fp32) attention on a CPU in one pass per block of query rows, built and loaded by
// cpu_attention_native.py.
//
// Per (head, block of query rows): S = q k^T for all keys in fp32 (oneDNN's brgemm micro-kernel through
// ATen's cpublas::brgemm, fp32 accumulation and output, also for bf16 inputs), row max, p = exp(scale (S - max))
// in fp32 with its fp32 row sum (AVX-512, 16 keys at a time), p rounded once to bf16 (for bf16; by AVX512-BF16's
// conversion where the CPU has it, else by integer rounding), O = p v in fp32 (brgemm again; for fp32
// summed over blocks of keys), out = O / sum, rounded once to bf16: the roundings of PyTorch's own flash attention, without
// its online-softmax rescaling (all of a block's scores fit in cache). k^T and v are laid out once per call as
// the micro-kernel takes them: for bf16 pair-interleaved along the reduction ("VNNI").
#include <ATen/native/CPUBlas.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <exception>
#include <string>
#include <vector>

#include "cpu_exp2.h"
#include "cpu_vec.h"  // (compiled for AVX-512 here: fastsd_vec::Vec is __m512)

namespace {

using bf16 = at::BFloat16;

inline uint16_t round_bf16(float f) {  // round to nearest even (inputs here are finite)
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

// 2^x for x in [-126, 0]: 2^floor(x) from the exponent bits times the polynomial for 2^frac(x) (cpu_exp2.h)
inline float exp2_neg(float x) {
  const float xi = std::floor(x);
  const int32_t bits = (static_cast<int32_t>(xi) + 127) << 23;
  float pow2;
  std::memcpy(&pow2, &bits, 4);
  return fastsd_exp2::fraction(x - xi) * pow2;
}

// 16 fp32 values stored as T: fp32 as they are; bf16 rounded to nearest even (as round_bf16), by AVX512-BF16's
// conversion (CVT: compiled for that function alone, called only where the CPU has it) or integer rounding
template <bool CVT>
inline void store16(float* p, __m512 e) {
  _mm512_storeu_ps(p, e);
}
__attribute__((target("avx512bf16"))) inline __m256i to_bf16_cvt(__m512 e) {
  return reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(e));
}
template <bool CVT>
inline void store16(uint16_t* p, __m512 e) {
  __m256i h;
  if constexpr (CVT) {
    h = to_bf16_cvt(e);
  } else {
    __m512i u = _mm512_castps_si512(e);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    u = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), lsb));
    h = _mm512_cvtepi32_epi16(_mm512_srli_epi32(u, 16));
  }
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), h);
}

// a (b, h, l, d) tensor's strides, last dimension contiguous
template <typename T>
struct View {
  const T* p;
  int64_t sb, sh, sl;
  const T* row(int64_t i, int64_t heads, int64_t r) const { return p + (i / heads) * sb + (i % heads) * sh + r * sl; }
};

// what differs between bf16 and fp32: the micro-kernel's element type and B layout, the roundings
template <typename T>
struct Elem;
template <>
struct Elem<uint16_t> {
  using Brgemm = bf16;
  static constexpr bool vnni = true;  // B as [K/2][N][2]: K (the head dim of q k^T, the keys of p v) paired
  static uint16_t from_float(float f) { return round_bf16(f); }
};
template <>
struct Elem<float> {
  using Brgemm = float;
  static constexpr bool vnni = false;  // B as [K][N]
  static float from_float(float f) { return f; }
};

// one row of scores s (lk keys, p padded to lkp): p = 2^(c (s - max)) as T, returns the fp32 sum of the
// unrounded terms. Below 2^-64 of the row's largest term nothing shows in an fp32 sum; the floor keeps p and p v
// away from denormal floats (a slow path in the micro-kernel)
template <typename T, bool CVT>
float softmax_row(const float* s, T* p, int64_t lk, int64_t lkp, float c) {
  __m512 vm = _mm512_set1_ps(-FLT_MAX);
  int64_t j = 0;
  for (; j + 16 <= lk; j += 16) vm = _mm512_max_ps(vm, _mm512_loadu_ps(s + j));
  float mx = _mm512_reduce_max_ps(vm);
  for (; j < lk; ++j) mx = std::max(mx, s[j]);
  const __m512 vmx = _mm512_set1_ps(mx), vc = _mm512_set1_ps(c), lo = _mm512_set1_ps(-64.f);
  __m512 acc = _mm512_setzero_ps();
  for (j = 0; j + 16 <= lk; j += 16) {
    const __m512 e = fastsd_vec::exp2_neg(_mm512_max_ps(_mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(s + j), vmx), vc), lo));
    store16<CVT>(p + j, e);
    acc = _mm512_add_ps(acc, e);
  }
  float sum = _mm512_reduce_add_ps(acc);
  for (; j < lk; ++j) {
    const float e = exp2_neg(std::max((s[j] - mx) * c, -64.f));
    p[j] = Elem<T>::from_float(e);
    sum += e;
  }
  for (j = lk; j < lkp; ++j) p[j] = T(0);
  return sum;
}

// row strides of k^T (keys), the scores (fp32) and p (elements) padded past the multiple of 4 KiB that 4096 keys
// give: rows 4 KiB apart share cache sets (the 20 rows of k^T a q k^T tile reads outnumber L1's ways); without
// the padding the kernel ran much slower inside a UNet call than alone (docs/cpu-path.md)
constexpr int64_t KPAD = 16, PAD = 16;
constexpr int64_t PV_KEYS_FP32 = 256;  // fp32 p v summed over blocks of this many keys: one accumulation over
// all of them (4096) doubled SDPA's fp32 error; bf16 keeps one (the same error, a little faster)

thread_local std::string g_error;  // what this thread's last failed call raised (fastsd_attention_error)

template <typename T>
int attention(const T* q, int64_t q_sb, int64_t q_sh, int64_t q_sl, const T* k, int64_t k_sb, int64_t k_sh,
              int64_t k_sl, const T* v, int64_t v_sb, int64_t v_sh, int64_t v_sl, T* out, int64_t o_sb,
              int64_t o_sh, int64_t o_sl, int64_t b, int64_t heads, int64_t lq, int64_t lk, int64_t d, float scale,
              int64_t block_m, int64_t block_n, int threads, bool bf16_cvt) {
  using E = Elem<T>;
  using B = typename E::Brgemm;
  constexpr int64_t pair = E::vnni ? 2 : 1;
  if (d % pair || lk < 1 || block_m < 1 || block_n < 1 || threads < 1) {
    g_error = "bad arguments (head dim must be even for bf16, at least one key)";
    return 1;
  }
  const View<T> Q{q, q_sb, q_sh, q_sl}, K{k, k_sb, k_sh, k_sl}, V{v, v_sb, v_sh, v_sl};
  const int64_t n = b * heads;
  const int64_t lkp = (lk + pair - 1) / pair * pair;  // keys padded to pairs for bf16 (p v pairs them)
  const int64_t dv = (d + 15) / 16 * 16;  // v's columns padded with zeros: p v in whole 16-float vectors
  // k^T as [d/pair][lkp][pair], v as [lkp/pair][dv][pair]; padding zero
  const int64_t ldk = lkp + KPAD;  // k^T's row stride in keys
  const auto kt_at = [&](int64_t c, int64_t j) { return (c / pair) * ldk * pair + j * pair + c % pair; };
  const auto vv_at = [&](int64_t j, int64_t c) { return (j / pair) * dv * pair + c * pair + j % pair; };
  std::vector<T> kt(static_cast<size_t>(n * d * ldk)), vv(static_cast<size_t>(n * lkp * dv));
  std::atomic<bool> failed{false};
  std::string error;
  const auto fail = [&](const char* what) {
#pragma omp critical
    {
      if (!failed.exchange(true)) error = what;
    }
  };
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    T* kp = kt.data() + i * d * ldk;
    T* vp = vv.data() + i * lkp * dv;
    for (int64_t j = 0; j < lkp; ++j) {
      const bool pad = j >= lk;
      const T* kr = pad ? nullptr : K.row(i, heads, j);
      const T* vr = pad ? nullptr : V.row(i, heads, j);
      for (int64_t c = 0; c < d; ++c) {
        kp[kt_at(c, j)] = pad ? T(0) : kr[c];
        vp[vv_at(j, c)] = pad ? T(0) : vr[c];
      }
      for (int64_t c = d; c < dv; ++c) vp[vv_at(j, c)] = T(0);
    }
  }
  const int64_t blocks = (lq + block_m - 1) / block_m;
  const int64_t lds = lkp + PAD, ldp = lkp + 2 * PAD;  // the scores' and p's row strides
  const bool cvt = E::vnni && bf16_cvt && __builtin_cpu_supports("avx512bf16");
#pragma omp parallel num_threads(threads)
  {
    std::vector<float> s_buf, o_buf, part, sums;
    std::vector<T> p_buf;
    try {  // nothing may leave a parallel region by an exception
      s_buf.resize(static_cast<size_t>(block_m * lds));
      o_buf.resize(static_cast<size_t>(block_m * dv));
      part.resize(static_cast<size_t>(block_m * dv));
      sums.resize(static_cast<size_t>(block_m));
      p_buf.resize(static_cast<size_t>(block_m * ldp));
    } catch (const std::exception& e) {
      fail(e.what());
    }
    auto block = [&](int64_t it) {
      const int64_t i = it / blocks, r0 = (it % blocks) * block_m, m = std::min(block_m, lq - r0);
      const T* kp = kt.data() + i * d * ldk;
      const T* vp = vv.data() + i * lkp * dv;
      const B* qa = reinterpret_cast<const B*>(Q.row(i, heads, r0));
      for (int64_t j = 0; j < lkp; j += block_n) {  // S = q k^T, fp32
        at::native::cpublas::brgemm(m, std::min(block_n, lkp - j), d, Q.sl, ldk, lds, false, qa,
                                    reinterpret_cast<const B*>(kp + j * pair), s_buf.data() + j, E::vnni);
      }
      const float c = scale * 1.4426950408889634f;  // exp(scale (s - max)) = 2^(c (s - max))
      for (int64_t r = 0; r < m; ++r) {
        const float* s = s_buf.data() + r * lds;
        T* p = p_buf.data() + r * ldp;
        sums[r] = cvt ? softmax_row<T, true>(s, p, lk, lkp, c) : softmax_row<T, false>(s, p, lk, lkp, c);
      }
      const int64_t pv_keys = E::vnni ? lkp : PV_KEYS_FP32;
      for (int64_t j = 0; j < lkp; j += pv_keys) {  // O = p v, fp32
        float* dst = j == 0 ? o_buf.data() : part.data();
        at::native::cpublas::brgemm(m, dv, std::min(pv_keys, lkp - j), ldp, dv, dv, false,
                                    reinterpret_cast<const B*>(p_buf.data() + j),
                                    reinterpret_cast<const B*>(vp + j * dv), dst, E::vnni);
        if (j > 0) {
          for (int64_t e = 0; e < m * dv; ++e) o_buf[e] += part[e];
        }
      }
      for (int64_t r = 0; r < m; ++r) {
        const float inv = 1.f / sums[r];
        const float* o = o_buf.data() + r * dv;
        T* dst = out + (i / heads) * o_sb + (i % heads) * o_sh + (r0 + r) * o_sl;
        for (int64_t col = 0; col < d; ++col) dst[col] = E::from_float(o[col] * inv);
      }
    };
#pragma omp for schedule(static)
    for (int64_t it = 0; it < n * blocks; ++it) {
      if (failed) continue;
      try {
        block(it);
      } catch (const std::exception& e) {
        fail(e.what());
      }
    }
    try {
      at::native::cpublas::brgemm_release(E::vnni);
    } catch (const std::exception&) {
    }
  }
  if (failed) {
    g_error = error.substr(0, error.find('\n'));
    return 1;
  }
  return 0;
}

}  // namespace

extern "C" const char* fastsd_attention_error() { return g_error.c_str(); }

// q (b, h, lq, d), k and v (b, h, lk, d), out (b, h, lq, d), all bf16 (bf16 != 0; 2: p rounded to bf16 by integer
// rounding even where the CPU has AVX512-BF16's conversion, the same result: for tests) or all fp32: any strides with
// the last dimension contiguous; d even for bf16. Returns 0, or 1 with the reason in fastsd_attention_error();
// no C++ exception crosses into the caller (ctypes) or out of a parallel region.
extern "C" int fastsd_attention(int bf16, const void* q, int64_t q_sb, int64_t q_sh, int64_t q_sl, const void* k,
                                int64_t k_sb, int64_t k_sh, int64_t k_sl, const void* v, int64_t v_sb, int64_t v_sh,
                                int64_t v_sl, void* out, int64_t o_sb, int64_t o_sh, int64_t o_sl, int64_t b,
                                int64_t heads, int64_t lq, int64_t lk, int64_t d, float scale, int64_t block_m,
                                int64_t block_n, int threads) {
  try {  // the allocation of the k^T / v layouts may throw
    if (bf16) {
      using U = uint16_t;
      return attention<U>(static_cast<const U*>(q), q_sb, q_sh, q_sl, static_cast<const U*>(k), k_sb, k_sh, k_sl,
                          static_cast<const U*>(v), v_sb, v_sh, v_sl, static_cast<U*>(out), o_sb, o_sh, o_sl, b,
                          heads, lq, lk, d, scale, block_m, block_n, threads, bf16 != 2);
    }
    return attention<float>(static_cast<const float*>(q), q_sb, q_sh, q_sl, static_cast<const float*>(k), k_sb, k_sh,
                            k_sl, static_cast<const float*>(v), v_sb, v_sh, v_sl, static_cast<float*>(out), o_sb,
                            o_sh, o_sl, b, heads, lq, lk, d, scale, block_m, block_n, threads, false);
  } catch (const std::exception& e) {
    g_error = e.what();
    return 1;
  }
}
