"""The GEMMs of a bf16 layer's Winograd F(2x2) convolution with bf16 operands (cpu_winograd_bf16.cpp): the
transformed tiles and weight rounded to bf16, products and sums in fp32, at the CPU's bf16 GEMM rate.

cpu_winograd's other variants run a bf16 layer's GEMMs in fp32; where AVX512-BF16's dot products run at about
twice fp32's rate (Zen 4/5) this one does F(2x2)'s 2.25x fewer multiplications than a direct convolution at the
bf16 rate, for 1.7x the error of torch's own bf16 convolution (within the kernels' 2x; F(4x4)'s larger transform
factors would make it ~9x, so it is not offered). PyTorch has no CPU bf16 GEMM with an fp32 output in Python;
ATen's C++ `cpublas::brgemm` (oneDNN's micro-kernel) has one, so this is C++ compiled on this machine at first use
(cpu_native.py), used where it loads and passes a self-test; `cpublas::brgemm` is a private ATen API: the build and
the self-test are its capability check. Offered on CPUs with native bf16 only (below it oneDNN has no bf16
micro-kernel); `FASTSD_CPU_NATIVE=0` never builds or uses it.
"""
from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from fastsd import cpuinfo
from fastsd.backends import cpu_native

SOURCE = Path(__file__).with_suffix(".cpp")
VERSION = 1  # part of the tuner's key for convolutions offered it
BLOCK_M, BLOCK_N = 64, 64  # tile rows converted at a time, output channels per micro-kernel call
FLAGS = cpu_native.BASE_FLAGS + cpu_native.AVX512
_I64, _PTR = ctypes.c_int64, ctypes.c_void_p
_ARGS = [_PTR, _PTR, _PTR] + [_I64] * 6 + [ctypes.c_int, ctypes.c_int]


def build(cxx: str | None = None, folder: Path | None = None) -> Path:
    return cpu_native.build(SOURCE, FLAGS, torch_api=True, cxx=cxx, folder=folder)


def _declare(lib: ctypes.CDLL) -> None:
    lib.fastsd_winograd_gemm_bf16.argtypes = _ARGS
    lib.fastsd_winograd_gemm_bf16.restype = ctypes.c_int
    lib.fastsd_winograd_bf16_error.restype = ctypes.c_char_p


@functools.cache
def _library() -> tuple[ctypes.CDLL | None, str | None]:
    if cpu_native.disabled():
        return None, f"{cpu_native.ENV}=0"
    if not cpuinfo.native_bf16():
        return None, f"needs native bf16 (AVX512-BF16 or AMX; this CPU runs {cpuinfo.aten_capability()})"
    return cpu_native.load_checked(build, _declare, _self_test)


def unavailable() -> str | None:
    """Why the bf16 GEMMs can't run here (None when they can). Builds them on the first call."""
    return _library()[1]


def library():
    """The loaded library, or None where it is unavailable."""
    return _library()[0]


def pairs(u: torch.Tensor) -> torch.Tensor:
    """(P, C, N) -> (P, ceil(C/2), N, 2) bf16, C pair-interleaved as the micro-kernel takes it (a zero row pads odd
    C)."""
    p, c, n = u.shape
    u = u.to(torch.bfloat16, memory_format=torch.contiguous_format)
    if c % 2:
        u = torch.cat([u, u.new_zeros(p, 1, n)], 1)
    return u.view(p, -1, 2, n).transpose(2, 3).contiguous()


def gemm(lib, t: torch.Tensor, u: torch.Tensor, prod: torch.Tensor, cvt: bool = True) -> None:
    """prod[p] = bf16(t[p]) @ u[p] with fp32 sums: t (P, M, C) fp32, u = pairs(...) (P, ceil(C/2), N, 2) bf16,
    prod (P, M, N) fp32, all contiguous. cvt=False: t rounded by integer rounding even where the CPU has
    AVX512-BF16's conversion (the same result: for tests)."""
    p, m, c = t.shape
    n = u.shape[2]
    if (t.dtype != torch.float32 or prod.dtype != torch.float32 or u.dtype != torch.bfloat16
            or u.shape != (p, (c + 1) // 2, n, 2) or prod.shape != (p, m, n)
            or not (t.is_contiguous() and u.is_contiguous() and prod.is_contiguous())):
        raise ValueError("the bf16 Winograd GEMMs take contiguous fp32 t (P, M, C), bf16 u (P, C/2, N, 2) and "
                         "fp32 prod (P, M, N)")
    rc = lib.fastsd_winograd_gemm_bf16(t.data_ptr(), u.data_ptr(), prod.data_ptr(), p, m, c, n, BLOCK_M, BLOCK_N,
                                       torch.get_num_threads(), int(cvt))
    if rc != 0:
        raise RuntimeError(f"bf16 Winograd GEMMs failed: {lib.fastsd_winograd_bf16_error().decode(errors='replace')}")


def _self_test(lib) -> None:
    """Odd reduction (a padded pair), rows and columns beyond a block with remainders, both conversions: the fp32
    GEMM of the same bf16-rounded operands to fp32 summation order."""
    g = torch.Generator().manual_seed(0)
    t = torch.randn(3, BLOCK_M + 5, 71, generator=g)
    w = torch.randn(3, 71, BLOCK_N + 3, generator=g)
    ref = torch.bmm(t.bfloat16().float(), w.bfloat16().float())
    for cvt in (True, False):
        prod = torch.full_like(ref, float("nan"))
        gemm(lib, t, pairs(w), prod, cvt)
        err = ((prod - ref).norm() / ref.norm()).item()
        if not err < 1e-5:
            raise RuntimeError(f"the self-test failed (error {err:.1e} against fp32 on the same bf16 operands)")
