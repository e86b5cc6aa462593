"""Attention on a CPU as one native kernel (cpu_attention_native.cpp): bf16 where bf16 is native, fp32 on
AVX-512. bf16 comes in two layouts the cpu backend's tuner chooses between: queries along the rows ("native")
and keys along the rows ("native_t", `keys_rows=True`: no head dim padded to whole vectors, an online softmax).

PyTorch has no CPU bf16 GEMM with an fp32 output in Python (cpu_attention.py spends two extra GEMMs making
up for that); ATen's C++ `cpublas::brgemm` (oneDNN's micro-kernel) has one. So the kernel is C++, compiled
on this machine at first use against the installed torch's headers and libraries (cpu_native.py). It is
used only where it loads and passes a self-test against fp32 (fp64) attention; otherwise `unavailable()`
says why and the cpu backend keeps the chunked torch path (bf16) or SDPA (fp32). `FASTSD_CPU_NATIVE=0`
never builds or uses it. `cpublas::brgemm` is a private ATen API: the build and the self-test are its
capability check.
"""
from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from fastsd import cpuinfo
from fastsd.backends import cpu_native

SOURCE = Path(__file__).with_suffix(".cpp")
ENV = cpu_native.ENV
VERSION = 2  # part of the tuner's key: choices timed against another version are measured again
VERSION_T = 1  # the same for the bf16 kernel with keys along the rows (attention_t in the C++, "native_t")
BLOCK_M, BLOCK_N = 64, 512  # query rows per block, keys per q k^T micro-kernel call (best of 32-128 x 256-1024)
BLOCK_M_T, BLOCK_N_T = 64, 256  # the same for native_t (keys per chunk of its online softmax)
FP32_MAX_HEAD_DIM = 160  # fp32 beyond (the VAE's 512): 2.2x SDPA's fp32 error (q k^T's long sums), SDPA kept
# AVX-512 (every CPU this runs on: native bf16 implies it), not the ISA in effect: the library cached for one CPU
# runs on any other with these flags; bf16 instructions only in the conversion of p to bf16, which checks the CPU
# itself (the micro-kernel picks its own)
# without -fassociative-math: it let GCC reorder the softmax sums differently in the two instantiations (p rounded
# by AVX512-BF16's conversion or by integer rounding), so the two stopped giving the same bits
FLAGS = cpu_native.BASE_FLAGS + tuple(f for f in cpu_native.FAST_MATH if f != "-fassociative-math") + cpu_native.AVX512
_I64, _PTR = ctypes.c_int64, ctypes.c_void_p
_ARGS = [ctypes.c_int] + [_PTR, _I64, _I64, _I64] * 4 + [_I64] * 5 + [ctypes.c_float, _I64, _I64, ctypes.c_int]


def build(cxx: str | None = None, folder: Path | None = None) -> Path:
    """The compiled library, from the cache or compiled now; raises RuntimeError with one line on failure."""
    return cpu_native.build(SOURCE, FLAGS, torch_api=True, cxx=cxx, folder=folder)


def _declare(lib: ctypes.CDLL) -> None:
    lib.fastsd_attention.argtypes = _ARGS
    lib.fastsd_attention.restype = ctypes.c_int
    lib.fastsd_attention_error.restype = ctypes.c_char_p


@functools.cache
def _library() -> tuple[ctypes.CDLL | None, str | None]:
    if cpu_native.disabled():
        return None, f"{ENV}=0"
    if not cpuinfo.native_bf16() and not avx512():
        return None, f"needs AVX-512 (this CPU runs {cpuinfo.aten_capability()})"
    return cpu_native.load_checked(build, _declare, _self_test)


@functools.cache
def avx512() -> bool:
    """ATen runs AVX-512 here (not restricted below it): where the fp32 kernel is offered. (Fixed for the
    process: ATen reads its restriction at start.)"""
    return cpuinfo.aten_capability() == "AVX512" and "avx512f" in cpuinfo.cpu_flags()


def unavailable() -> str | None:
    """Why the native kernel can't run here (None when it can). Builds it on the first call."""
    return _library()[1]


def fp32_unavailable() -> str | None:
    """Why the cpu backend doesn't offer the fp32 kernel here (None when it does): AVX-512 only, as restricted to
    AVX2 it was slower than SDPA."""
    if not avx512():
        return "fp32 is offered on AVX-512 only"
    return unavailable()


def _run(lib: ctypes.CDLL, q, k, v, scale: float | None, bf16_cvt: bool = True, keys_rows: bool = False
         ) -> torch.Tensor:
    """bf16_cvt=False: p rounded to bf16 by integer rounding even where the CPU has the conversion instruction
    (the path of a CPU without it; the same result). keys_rows: the bf16 kernel with keys along the rows."""
    b, h, lq, d = q.shape
    lk = k.shape[2]
    bf16 = q.dtype == torch.bfloat16
    if q.dtype not in (torch.bfloat16, torch.float32) or k.dtype != q.dtype or v.dtype != q.dtype or lk == 0 \
            or (bf16 and d % 2):
        raise ValueError("native attention takes bf16 (even head dim) or fp32 q, k, v and at least one key")
    if bf16 and not cpuinfo.native_bf16():  # oneDNN has no bf16 micro-kernel below AVX512-BF16
        raise ValueError("native bf16 attention needs native bf16 (AVX512-BF16 or AMX, not restricted below it)")
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    out = torch.empty(b, lq, h, d, dtype=q.dtype, device=q.device).transpose(1, 2)  # (B, L, H, D) memory:
    args = []  # the caller's transpose(1, 2).reshape(B, L, H*D) is then free
    for t in (q, k, v, out):
        args += [t.data_ptr(), t.stride(0), t.stride(1), t.stride(2)]
    scale = d ** -0.5 if scale is None else scale
    if keys_rows and not bf16:
        raise ValueError("native attention with keys along the rows takes bf16 only")
    mode = (1 if bf16_cvt else 2) + (2 if keys_rows else 0) if bf16 else 0
    blocks = (BLOCK_M_T, BLOCK_N_T) if keys_rows else (BLOCK_M, BLOCK_N)
    rc = lib.fastsd_attention(mode, *args, b, h, lq, lk, d, scale, *blocks, torch.get_num_threads())
    if rc != 0:
        raise RuntimeError(f"native attention failed: {lib.fastsd_attention_error().decode(errors='replace')}")
    return out


def _self_test(lib: ctypes.CDLL) -> None:
    """Odd key count, strided (B, L, H, D) views, more query rows than a block, each dtype this CPU gets: within
    2x of SDPA's error against a wider computation on the same inputs (fp32 for bf16, fp64 for fp32)."""
    sdpa = torch.nn.functional.scaled_dot_product_attention
    for dtype, wide in ((torch.bfloat16, torch.float32), (torch.float32, torch.float64)):
        if dtype == torch.bfloat16 and not cpuinfo.native_bf16():
            continue
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(2, n, 3, 40, generator=g).transpose(1, 2).to(dtype) for n in (BLOCK_M + 5, 77, 77))
        ref = sdpa(q.to(wide), k.to(wide), v.to(wide))
        rel = lambda o: ((o.to(wide) - ref).norm() / ref.norm()).item()  # noqa: E731
        torch_err = rel(sdpa(q, k, v))
        for keys_rows in (False, True) if dtype == torch.bfloat16 else (False,):
            ours = rel(_run(lib, q, k, v, None, keys_rows=keys_rows))
            if not ours <= 2 * torch_err:
                raise RuntimeError(f"the {str(dtype)[6:]}{' keys-rows' if keys_rows else ''} self-test failed "
                                   f"(error {ours:.2e}, SDPA's {torch_err:.2e})")


def attention_native(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None,
                     keys_rows: bool = False) -> torch.Tensor:
    """q (B, H, Lq, D), k/v (B, H, Lk, D), bf16 (D even) or fp32 -> (B, H, Lq, D), non-causal; any strides.
    keys_rows (bf16): S^T = k q^T a chunk of keys at a time with an online softmax, O^T = v^T p^T: no head dim
    padded to whole vectors (40 computes 48 otherwise), the softmax down columns of 16 queries."""
    lib, why = _library()
    if lib is None:
        raise RuntimeError(f"native attention unavailable: {why}")
    return _run(lib, q, k, v, scale, keys_rows=keys_rows)
