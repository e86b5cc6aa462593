// Work items over OpenMP threads for the native pieces that call ATen's brgemm micro-kernel (the attention
// kernels, the bf16 Winograd convolution): each thread makes its scratch (`make()`, which may throw), runs
// `body(item, scratch)` for its share of the items (schedule static), and releases the micro-kernel's state.
// Nothing leaves the parallel region by an exception: the first one's message, first line, goes to `error`.
#pragma once

#include <ATen/native/CPUBlas.h>
#include <omp.h>

#include <atomic>
#include <cstdint>
#include <exception>
#include <string>

namespace fastsd_items {

// true when every item ran; else false with `error` set
template <class Make, class Body>
bool run(int64_t items, int threads, bool vnni, Make make, Body body, std::string& error) {
  std::atomic<bool> failed{false};
  const auto fail = [&](const char* what) {
#pragma omp critical
    {
      if (!failed.exchange(true)) error = what;
    }
  };
#pragma omp parallel num_threads(threads)
  {
    decltype(make()) scratch{};
    try {
      scratch = make();
    } catch (const std::exception& e) {
      fail(e.what());
    }
#pragma omp for schedule(static)
    for (int64_t it = 0; it < items; ++it) {
      if (failed) continue;
      try {
        body(it, scratch);
      } catch (const std::exception& e) {
        fail(e.what());
      }
    }
    try {
      at::native::cpublas::brgemm_release(vnni);
    } catch (const std::exception&) {
    }
  }
  error = error.substr(0, error.find('\n'));
  return !failed;
}

}  // namespace fastsd_items
