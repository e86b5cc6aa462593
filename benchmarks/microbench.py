"""Helpers of the pytest-benchmark microbenchmarks (benchmarks/bench_<op>.py): device, dtype, when the
Triton variant can run, and the timing call with FLOP/byte throughput in `extra_info`."""
from __future__ import annotations

import pytest
import torch

from . import kernel_cases as K

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.float16 if CUDA else torch.float32  # fp16 is what SD runs on GPUs; CPU kernels prefer fp32
DTYPE_NAME = {torch.float16: "fp16", torch.float32: "fp32"}[DTYPE]
RES = 512
BACKENDS = ["torch", "triton"]


def triton_skip_reason() -> str | None:
    """Triton timings only mean something on a GPU; under the CPU interpreter they'd be hours of nothing."""
    if not CUDA:
        return "triton variant needs CUDA (no GPU here; the Triton CPU interpreter is not a benchmark)"
    from fastsd.backends.triton import import_error as triton_import_error

    err = triton_import_error()
    return f"triton does not import: {err}" if err else None


def ids(shapes: list[K.Shape]) -> list[str]:
    return [s.label.replace(" ", "_") for s in shapes]


def run(benchmark, case: K.Case, shape: K.Shape, backend: str):
    if backend == "triton" and (why := triton_skip_reason()):
        pytest.skip(why)
    ref_fn, tri_fn = case.make(shape.args, DTYPE, DEVICE)
    fn = ref_fn if backend == "torch" else tri_fn

    def call():
        out = fn()
        if CUDA:
            torch.cuda.synchronize()
        return out

    benchmark.group = f"{case.op} {shape.label}"
    benchmark.extra_info.update(op=case.op, shape=shape.label, backend=backend, dtype=DTYPE_NAME, device=DEVICE,
                                flops=shape.flops, bytes=shape.bytes_)
    with torch.inference_mode():
        out = benchmark(call)
    med = benchmark.stats.stats.median if benchmark.stats else None
    if med:
        benchmark.extra_info.update(tflops=shape.flops / med / 1e12, gbps=shape.bytes_ / med / 1e9)
    if backend == "triton":  # a fast wrong kernel is no result
        with torch.inference_mode():
            ref = ref_fn()
        err = ((out.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30)).item()
        benchmark.extra_info["max_rel_err"] = err
        assert err < 2e-2, f"triton result differs from the torch reference (max rel err {err:.3g})"
    return out
