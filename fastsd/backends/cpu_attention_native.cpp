// bf16 attention on a CPU in one pass per block of query rows, built and loaded by cpu_attention_native.py.
//
// Per (head, block of query rows): S = q k^T for all keys in fp32 (oneDNN's bf16 brgemm micro-kernel through
// ATen's cpublas::brgemm, fp32 accumulation and output), row max, p = exp(scale * (S - max)) in fp32 with
// its fp32 row sum, p rounded once to bf16, O = p v in fp32 (brgemm again), out = O / sum rounded once to
// bf16: the roundings of PyTorch's own flash attention for bf16, without its online-softmax rescaling
// (all of a block's scores fit in cache) and with k^T and v laid out once per call in the pair-interleaved
// ("VNNI") layout the bf16 micro-kernel takes.
#include <ATen/native/CPUBlas.h>
#include <c10/util/BFloat16.h>
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <new>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <exception>
#include <string>
#include <vector>

namespace {

using bf16 = at::BFloat16;

inline uint16_t round_bf16(float f) {  // round to nearest even (inputs here are finite)
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

// 2^x for x in [-126, 0]: 2^floor(x) from the exponent bits times a degree-5 polynomial for 2^frac(x)
// (relative error < 1e-7 on [0, 1)), vectorised by the compiler; faster here than libm's vectorised expf
inline float exp2_neg(float x) {
  const float xi = std::floor(x);
  const float f = x - xi;
  float p = 1.8775767e-3f;
  p = p * f + 8.9893397e-3f;
  p = p * f + 5.5826318e-2f;
  p = p * f + 2.4015361e-1f;
  p = p * f + 6.9315308e-1f;
  p = p * f + 9.9999994e-1f;
  const int32_t bits = (static_cast<int32_t>(xi) + 127) << 23;
  float pow2;
  std::memcpy(&pow2, &bits, 4);
  return p * pow2;
}

// a (b, h, l, d) tensor's strides, last dimension contiguous
struct View {
  const uint16_t* p;
  int64_t sb, sh, sl;
  const uint16_t* row(int64_t i, int64_t heads, int64_t r) const { return p + (i / heads) * sb + (i % heads) * sh + r * sl; }
};

thread_local std::string g_error;  // what this thread's last failed call raised (fastsd_attention_error)

}  // namespace

extern "C" const char* fastsd_attention_error() { return g_error.c_str(); }

// q (b, h, lq, d), k and v (b, h, lk, d), out (b, h, lq, d): any strides with the last dimension contiguous;
// d even. Returns 0, or 1 with the reason in fastsd_attention_error(); no C++ exception crosses into the caller
// (ctypes) or out of a parallel region.
extern "C" int fastsd_attention_bf16(
    const uint16_t* q, int64_t q_sb, int64_t q_sh, int64_t q_sl,
    const uint16_t* k, int64_t k_sb, int64_t k_sh, int64_t k_sl,
    const uint16_t* v, int64_t v_sb, int64_t v_sh, int64_t v_sl,
    uint16_t* out, int64_t o_sb, int64_t o_sh, int64_t o_sl,
    int64_t b, int64_t heads, int64_t lq, int64_t lk, int64_t d, float scale,
    int64_t block_m, int64_t block_n, int threads) {
  try {  // the allocation of the k^T / v layouts may throw
    if (d % 2 || lk < 1 || block_m < 1 || block_n < 1 || threads < 1) {
      g_error = "bad arguments (head dim must be even, at least one key)";
      return 1;
    }
    const View Q{q, q_sb, q_sh, q_sl}, K{k, k_sb, k_sh, k_sl}, V{v, v_sb, v_sh, v_sl};
    const int64_t n = b * heads;
    const int64_t lkp = (lk + 1) & ~int64_t(1);  // keys padded to even: p v pairs them along its K
    const int64_t dv = (d + 15) / 16 * 16;  // v's columns padded with zeros: p v in whole 16-float vectors
    std::vector<uint16_t> kt(static_cast<size_t>(n * d * lkp)), vv(static_cast<size_t>(n * lkp * dv));
    std::atomic<bool> failed{false};
    std::string error;
    const auto fail = [&](const char* what) {
#pragma omp critical
      {
        if (!failed.exchange(true)) error = what;
      }
    };
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t i = 0; i < n; ++i) {  // k^T as [d/2][lkp][2], v as [lkp/2][dv][2]; padding zero
      uint16_t* kp = kt.data() + i * d * lkp;
      uint16_t* vp = vv.data() + i * lkp * dv;
      for (int64_t j = 0; j < lkp; ++j) {
        const bool pad = j >= lk;
        const uint16_t* kr = pad ? nullptr : K.row(i, heads, j);
        const uint16_t* vr = pad ? nullptr : V.row(i, heads, j);
        for (int64_t c = 0; c < d; ++c) {
          kp[(c >> 1) * lkp * 2 + j * 2 + (c & 1)] = pad ? 0 : kr[c];
          vp[(j >> 1) * dv * 2 + c * 2 + (j & 1)] = pad ? 0 : vr[c];
        }
        for (int64_t c = d; c < dv; ++c) vp[(j >> 1) * dv * 2 + c * 2 + (j & 1)] = 0;
      }
    }
    const int64_t blocks = (lq + block_m - 1) / block_m;
#pragma omp parallel num_threads(threads)
    {
      std::vector<float> s_buf, o_buf, sums;
      std::vector<uint16_t> p_buf;
      try {  // nothing may leave a parallel region by an exception
        s_buf.resize(static_cast<size_t>(block_m * lkp));
        o_buf.resize(static_cast<size_t>(block_m * dv));
        sums.resize(static_cast<size_t>(block_m));
        p_buf.resize(static_cast<size_t>(block_m * lkp));
      } catch (const std::exception& e) {
        fail(e.what());
      }
      auto block = [&](int64_t it) {
        const int64_t i = it / blocks, r0 = (it % blocks) * block_m, m = std::min(block_m, lq - r0);
        const uint16_t* kp = kt.data() + i * d * lkp;
        const uint16_t* vp = vv.data() + i * lkp * dv;
        const bf16* qa = reinterpret_cast<const bf16*>(Q.row(i, heads, r0));
        for (int64_t j = 0; j < lkp; j += block_n) {  // S = q k^T, fp32
          at::native::cpublas::brgemm(m, std::min(block_n, lkp - j), d, Q.sl, lkp, lkp, false, qa,
                                      reinterpret_cast<const bf16*>(kp + j * 2), s_buf.data() + j, true);
        }
        for (int64_t r = 0; r < m; ++r) {
          const float* s = s_buf.data() + r * lkp;
          uint16_t* p = p_buf.data() + r * lkp;
          float mx = -FLT_MAX;
          for (int64_t j = 0; j < lk; ++j) mx = std::max(mx, s[j]);
          const float c = scale * 1.4426950408889634f;  // exp(scale (s - max)) = 2^(c (s - max))
          float sum = 0.f;
          for (int64_t j = 0; j < lk; ++j) {
            // below 2^-64 of the row's largest term nothing shows in an fp32 sum; the floor keeps p and p v away
            // from denormal floats (a slow path in the micro-kernel)
            const float e = exp2_neg(std::max((s[j] - mx) * c, -64.f));
            p[j] = round_bf16(e);
            sum += e;
          }
          if (lkp > lk) p[lk] = 0;
          sums[r] = sum;
        }
        at::native::cpublas::brgemm(m, dv, lkp, lkp, dv, dv, false, reinterpret_cast<const bf16*>(p_buf.data()),
                                    reinterpret_cast<const bf16*>(vp), o_buf.data(), true);  // O = p v, fp32
        for (int64_t r = 0; r < m; ++r) {
          const float inv = 1.f / sums[r];
          const float* o = o_buf.data() + r * dv;
          uint16_t* dst = out + (i / heads) * o_sb + (i % heads) * o_sh + (r0 + r) * o_sl;
          for (int64_t c = 0; c < d; ++c) dst[c] = round_bf16(o[c] * inv);
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
        at::native::cpublas::brgemm_release(true);
      } catch (const std::exception&) {
      }
    }
    if (failed) {
      g_error = error.substr(0, error.find('\n'));
      return 1;
    }
    return 0;
  } catch (const std::exception& e) {
    g_error = e.what();
    return 1;
  }
}
