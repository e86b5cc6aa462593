// GroupNorm, optionally followed by SiLU, over channels-last (NHWC) activations, fp32 or bf16 in and out, built
// and loaded by cpu_group_norm.py.
//
// Two passes over x: per-channel sums of x - x0 and its squares (x0: the channel's first value, so the squares
// stay at the variance's scale) in fp32 over 4 pixels, then double (fp32 sums over 64 pixels put enough error
// into rstd to double the output's) across pixels, threads and a group's channels; then per channel
// y = (x - mean) * scale + bias (rstd and weight folded), SiLU on y in fp32 where asked, written once (bf16
// rounded to nearest even). PyTorch runs the norm and the SiLU as two passes, each writing.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu_elem.h"
#include "cpu_exp2.h"

namespace {

constexpr int64_t ROWS = 64, SUB = 4;  // pixels per work item of the statistics pass, per fp32 partial sum

template <typename T>
void group_norm(const T* x, const float* w, const float* b, T* out, int64_t n, int64_t hw, int64_t c, int64_t g,
                float eps, bool silu, int threads) {
  const int64_t cg = c / g;
  std::vector<double> sums(static_cast<size_t>(threads * n * c * 2), 0.0);  // per thread: (image, channel) S, Q
  std::vector<float> x0(static_cast<size_t>(n * c));
  for (int64_t img = 0; img < n; ++img)
    for (int64_t ch = 0; ch < c; ++ch) x0[img * c + ch] = load(x + img * hw * c, ch);
  const int64_t blocks = (hw + ROWS - 1) / ROWS;
#pragma omp parallel num_threads(threads)
  {
    double* mine = sums.data() + omp_get_thread_num() * n * c * 2;
    std::vector<double> s(c), q(c);
    std::vector<float> s8(c), q8(c);
#pragma omp for schedule(static)
    for (int64_t item = 0; item < n * blocks; ++item) {
      const int64_t img = item / blocks, r0 = (item % blocks) * ROWS, r1 = std::min(hw, r0 + ROWS);
      const float* shift = x0.data() + img * c;
      std::fill(s.begin(), s.end(), 0.0);
      std::fill(q.begin(), q.end(), 0.0);
      for (int64_t rs = r0; rs < r1; rs += SUB) {
        std::fill(s8.begin(), s8.end(), 0.f);
        std::fill(q8.begin(), q8.end(), 0.f);
        for (int64_t r = rs; r < std::min(r1, rs + SUB); ++r) {
          const T* xr = x + (img * hw + r) * c;
#pragma omp simd
          for (int64_t ch = 0; ch < c; ++ch) {
            const float v = load(xr, ch) - shift[ch];
            s8[ch] += v;
            q8[ch] += v * v;
          }
        }
#pragma omp simd
        for (int64_t ch = 0; ch < c; ++ch) {
          s[ch] += s8[ch];
          q[ch] += q8[ch];
        }
      }
      double* acc = mine + img * c * 2;
      for (int64_t ch = 0; ch < c; ++ch) {
        acc[ch] += s[ch];
        acc[c + ch] += q[ch];
      }
    }
  }
  std::vector<float> mean_c(static_cast<size_t>(n * c)), scale(static_cast<size_t>(n * c)),
      shift(static_cast<size_t>(n * c));
  const double count = static_cast<double>(hw * cg);
  for (int64_t img = 0; img < n; ++img) {
    for (int64_t gi = 0; gi < g; ++gi) {
      double sum = 0.0, sq = 0.0;  // of x over the group, from each channel's shifted sums
      for (int64_t ch = gi * cg; ch < (gi + 1) * cg; ++ch) {
        double s = 0.0, q = 0.0;
        for (int t = 0; t < threads; ++t) {
          s += sums[((t * n + img) * 2) * c + ch];
          q += sums[((t * n + img) * 2 + 1) * c + ch];
        }
        const double a = x0[img * c + ch];
        sum += s + hw * a;
        sq += q + 2.0 * a * s + hw * a * a;
      }
      const double mean = sum / count, var = std::max(sq / count - mean * mean, 0.0);
      const double rstd = 1.0 / std::sqrt(var + eps);
      for (int64_t ch = gi * cg; ch < (gi + 1) * cg; ++ch) {
        const double wc = w ? w[ch] : 1.0, bc = b ? b[ch] : 0.0;
        mean_c[img * c + ch] = static_cast<float>(mean);
        scale[img * c + ch] = static_cast<float>(rstd * wc);
        shift[img * c + ch] = static_cast<float>(bc);
      }
    }
  }
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t r = 0; r < n * hw; ++r) {
    const float* mc = mean_c.data() + (r / hw) * c;
    const float* sc = scale.data() + (r / hw) * c;
    const float* sh = shift.data() + (r / hw) * c;
    const T* xr = x + r * c;
    T* o = out + r * c;
    if (silu) {
#pragma omp simd
      for (int64_t ch = 0; ch < c; ++ch) {
        const float y = (load(xr, ch) - mc[ch]) * sc[ch] + sh[ch];
        store(o, ch, y / (1.f + fastsd_exp2::exp_clamped(-y)));
      }
    } else {
#pragma omp simd
      for (int64_t ch = 0; ch < c; ++ch) store(o, ch, (load(xr, ch) - mc[ch]) * sc[ch] + sh[ch]);
    }
  }
}

}  // namespace

// x and out: (n, hw, c) contiguous, bf16 (bf16 != 0) or fp32; weight, bias: c fp32 values or null. 0 on success,
// 1 for groups that don't divide the channels.
extern "C" int fastsd_group_norm(int bf16, const void* x, const float* w, const float* b, void* out, int64_t n,
                                 int64_t hw, int64_t c, int64_t g, float eps, int silu, int threads) {
  if (g < 1 || c % g != 0 || n < 1 || hw < 1 || threads < 1) return 1;
  if (bf16) {
    group_norm(static_cast<const uint16_t*>(x), w, b, static_cast<uint16_t*>(out), n, hw, c, g, eps, silu != 0,
               threads);
  } else {
    group_norm(static_cast<const float*>(x), w, b, static_cast<float*>(out), n, hw, c, g, eps, silu != 0, threads);
  }
  return 0;
}
