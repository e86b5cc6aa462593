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
// bf16 also with keys along the rows (attention_t, below): the cpu backend's tuner picks one per shape.
#include <ATen/native/CPUBlas.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <exception>
#include <string>
#include <vector>

#include "cpu_exp2.h"
#include "cpu_items.h"
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
  struct Scratch {
    std::vector<float> s_buf, o_buf, part, sums;
    std::vector<T> p_buf;
  };
  const auto make = [&] {
    const auto floats = [](int64_t count) { return std::vector<float>(static_cast<size_t>(count)); };
    return Scratch{floats(block_m * lds), floats(block_m * dv), floats(block_m * dv), floats(block_m),
                   std::vector<T>(static_cast<size_t>(block_m * ldp))};
  };
  const auto block = [&](int64_t it, Scratch& scratch) {
    auto& [s_buf, o_buf, part, sums, p_buf] = scratch;
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
  std::string error;
  if (!fastsd_items::run(n * blocks, threads, E::vnni, make, block, error)) {
    g_error = error;
    return 1;
  }
  return 0;
}

// ---- bf16 with keys along the rows ("native_t"): per (head, block of up to 128 query rows), for each chunk of
// block_n keys: S^T = k q^T (keys x queries, fp32: k as it is, q^T pair-interleaved), its column maxima, the
// terms p^T = 2^(c (s - max)) with their fp32 column sums (16 queries a vector: no horizontal reductions), p^T
// rounded once to bf16 pair-interleaved along the keys, O^T += v^T p^T (d x queries). A chunk whose maximum
// exceeds the earlier ones' rescales O^T and the sums first (online softmax, as PyTorch's flash attention). The
// head dim is a GEMM's row count here, not its vector width: d = 40 wastes no padded columns (p v in whole
// 16-float vectors computes 48). out = O / sum, transposed back, rounded once to bf16.

// 2^x for x <= 0, floored at 2^-64 as softmax_row: the degree-3 polynomial (the terms go to bf16); scalef
// multiplies by 2^floor(x) itself
inline __m512 exp2_bf16_terms(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-64.f));
  const __m512 f = _mm512_reduce_ps(x, _MM_FROUND_TO_NEG_INF);  // x - floor(x)
  namespace k = fastsd_exp2;
  __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(k::B3), f, _mm512_set1_ps(k::B2));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(k::B1));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(k::B0));
  return _mm512_scalef_ps(p, x);
}

// keys 2j (e0) and 2j+1 (e1) of 16 queries rounded to bf16 as the 16 pairs [q][2] (VNNI B rows): AVX512-BF16's
// conversion of both and one permutation (CVT), or integer rounding to nearest even into each 32-bit lane
__attribute__((target("avx512bf16"))) inline __m512i pairs_cvt(__m512 e0, __m512 e1) {
  const __m512i idx = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21,
                                       5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  return _mm512_permutexvar_epi16(idx, reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(e1, e0)));
}
inline __m512i rounded_bits(__m512 e) {  // fp32 bits rounded to nearest even at bit 16
  const __m512i u = _mm512_castps_si512(e);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  return _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), lsb));
}
template <bool CVT>
inline __m512i pairs(__m512 e0, __m512 e1) {
  if constexpr (CVT) {
    return pairs_cvt(e0, e1);
  } else {
    return _mm512_or_si512(_mm512_srli_epi32(rounded_bits(e0), 16),
                           _mm512_and_si512(rounded_bits(e1), _mm512_set1_epi32(static_cast<int>(0xffff0000u))));
  }
}

constexpr int64_t T_MAX_ROWS = 128;  // query rows a block (8 vectors of maxima and sums in registers)

// one chunk of nv valid keys (nb, even, with its padding): column maxima of S^T (np queries), rescaling of the
// sums and O^T (d rows) when they grow (not for the first chunk), the terms p^T as VNNI pairs
template <bool CVT>
void chunk_terms(const float* st, uint16_t* pt, float* ot, int64_t nv, int64_t nb, int64_t np, int64_t d, float c,
                 bool first, __m512* mx, __m512* sum) {
  const __m512 vc = _mm512_set1_ps(c);
  __m512 nmc[T_MAX_ROWS / 16];
  for (int64_t t = 0; t < np / 16; ++t) {
    __m512 m = mx[t];
    for (int64_t j = 0; j < nv; ++j) m = _mm512_max_ps(m, _mm512_loadu_ps(st + j * np + t * 16));
    if (!first) {
      const __m512 f = exp2_bf16_terms(_mm512_mul_ps(_mm512_sub_ps(mx[t], m), vc));
      sum[t] = _mm512_mul_ps(sum[t], f);
      for (int64_t col = 0; col < d; ++col) {
        float* o = ot + col * np + t * 16;
        _mm512_storeu_ps(o, _mm512_mul_ps(_mm512_loadu_ps(o), f));
      }
    }
    mx[t] = m;
    nmc[t] = _mm512_mul_ps(m, _mm512_set1_ps(-c));
  }
  const __m512 zero = _mm512_setzero_ps();
  for (int64_t j = 0; j < nb; j += 2) {
    const float* s0 = st + j * np;
    for (int64_t t = 0; t < np / 16; ++t) {
      const __m512 e0 = j < nv ? exp2_bf16_terms(_mm512_fmadd_ps(_mm512_loadu_ps(s0 + t * 16), vc, nmc[t])) : zero;
      const __m512 e1 =
          j + 1 < nv ? exp2_bf16_terms(_mm512_fmadd_ps(_mm512_loadu_ps(s0 + np + t * 16), vc, nmc[t])) : zero;
      sum[t] = _mm512_add_ps(sum[t], _mm512_add_ps(e0, e1));
      _mm512_storeu_si512(pt + j * np + t * 32, pairs<CVT>(e0, e1));
    }
  }
}

int attention_t(const View<uint16_t>& Q, const View<uint16_t>& K, const View<uint16_t>& V, uint16_t* out, int64_t o_sb,
                int64_t o_sh, int64_t o_sl, int64_t b, int64_t heads, int64_t lq, int64_t lk, int64_t d, float scale,
                int64_t block_m, int64_t block_n, int threads, bool bf16_cvt) {
  using T = uint16_t;
  if (d % 2 || lk < 1 || block_m < 16 || block_m % 16 || block_m > T_MAX_ROWS || block_n < 2 || block_n % 2 ||
      threads < 1) {
    g_error = "bad arguments (head dim must be even for bf16, at least one key, block sizes)";
    return 1;
  }
  const int64_t n = b * heads, lkp = (lk + 1) / 2 * 2;
  const int64_t ldv = lkp + 2 * KPAD;  // v^T's row stride, off a multiple of 4 KiB (the d rows p v reads at once)
  std::vector<T> vt(static_cast<size_t>(n * d * ldv));
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t i = 0; i < n; ++i) {  // v^T as [d][ldv], padding zero
    T* vp = vt.data() + i * d * ldv;
    for (int64_t j = 0; j < lk; ++j) {
      const T* vr = V.row(i, heads, j);
      for (int64_t col = 0; col < d; ++col) vp[col * ldv + j] = vr[col];
    }
    for (int64_t col = 0; col < d; ++col) std::fill(vp + col * ldv + lk, vp + (col + 1) * ldv, T(0));
  }
  const int64_t blocks = (lq + block_m - 1) / block_m;
  const bool cvt = bf16_cvt && __builtin_cpu_supports("avx512bf16");
  struct Scratch {
    std::vector<float> st, ot;
    std::vector<T> qt, pt;
  };
  const auto make = [&] {
    const auto vec = [](auto zero, int64_t count) { return std::vector<decltype(zero)>(static_cast<size_t>(count)); };
    return Scratch{vec(0.f, block_n * block_m), vec(0.f, d * block_m), vec(T(0), d * block_m),
                   vec(T(0), block_n * block_m)};
  };
  const auto block = [&](int64_t it, Scratch& scratch) {
    auto& [st, ot, qt, pt] = scratch;
    const int64_t i = it / blocks, r0 = (it % blocks) * block_m, m = std::min(block_m, lq - r0);
    const int64_t np = (m + 15) / 16 * 16;  // query columns, padded to whole vectors with zero queries
    for (int64_t r = 0; r < np; ++r) {  // q^T as [d/2][np][2]
      const T* qr = r < m ? Q.row(i, heads, r0 + r) : nullptr;
      for (int64_t col = 0; col < d; ++col) qt[(col / 2) * np * 2 + r * 2 + col % 2] = qr ? qr[col] : T(0);
    }
    const float c = scale * 1.4426950408889634f;  // exp(scale (s - max)) = 2^(c (s - max))
    __m512 mx[T_MAX_ROWS / 16], sum[T_MAX_ROWS / 16];
    for (int64_t t = 0; t < np / 16; ++t) mx[t] = _mm512_set1_ps(-FLT_MAX), sum[t] = _mm512_setzero_ps();
    const bf16* vti = reinterpret_cast<const bf16*>(vt.data() + i * d * ldv);
    for (int64_t j = 0; j < lkp; j += block_n) {
      const int64_t nb = std::min(block_n, lkp - j), nv = std::min(nb, lk - j);
      at::native::cpublas::brgemm(nv, np, d, K.sl, np, np, false, reinterpret_cast<const bf16*>(K.row(i, heads, j)),
                                  reinterpret_cast<const bf16*>(qt.data()), st.data(), true);
      if (cvt) {
        chunk_terms<true>(st.data(), pt.data(), ot.data(), nv, nb, np, d, c, j == 0, mx, sum);
      } else {
        chunk_terms<false>(st.data(), pt.data(), ot.data(), nv, nb, np, d, c, j == 0, mx, sum);
      }
      at::native::cpublas::brgemm(d, np, nb, ldv, np, np, j > 0, vti + j, reinterpret_cast<const bf16*>(pt.data()),
                                  ot.data(), true);
    }
    alignas(64) float inv[T_MAX_ROWS];
    for (int64_t t = 0; t < np / 16; ++t) _mm512_store_ps(inv + t * 16, _mm512_div_ps(_mm512_set1_ps(1.f), sum[t]));
    for (int64_t r = 0; r < m; ++r) {
      T* dst = out + (i / heads) * o_sb + (i % heads) * o_sh + (r0 + r) * o_sl;
      for (int64_t col = 0; col < d; ++col) dst[col] = round_bf16(ot[col * np + r] * inv[r]);
    }
  };
  std::string error;
  if (!fastsd_items::run(n * blocks, threads, true, make, block, error)) {
    g_error = error;
    return 1;
  }
  return 0;
}

}  // namespace

extern "C" const char* fastsd_attention_error() { return g_error.c_str(); }

// q (b, h, lq, d), k and v (b, h, lk, d), out (b, h, lq, d), all bf16 (bf16 != 0; 2: p rounded to bf16 by integer
// rounding even where the CPU has AVX512-BF16's conversion, the same result: for tests; 3 and 4: the same two with
// keys along the rows, attention_t, block_m a multiple of 16 up to 128, block_n even) or all fp32: any strides with
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
      if (bf16 >= 3) {
        const View<U> Q{static_cast<const U*>(q), q_sb, q_sh, q_sl}, K{static_cast<const U*>(k), k_sb, k_sh, k_sl},
            V{static_cast<const U*>(v), v_sb, v_sh, v_sl};
        return attention_t(Q, K, V, static_cast<U*>(out), o_sb, o_sh, o_sl, b, heads, lq, lk, d, scale, block_m,
                           block_n, threads, bf16 == 3);
      }
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
