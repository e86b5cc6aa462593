"""fp32 attention on a CPU as register-blocked micro-kernels for q k^T and p v with the softmax between them
(cpu_attention_fp32.cpp: plain C++ with vector intrinsics and OpenMP, no ATen API), compiled at first use
(cpu_native.py) for the vector ISA ATen runs here, AVX-512 or AVX2 + FMA (the same code over 16- or 8-float
vectors). Transposed: per block of queries, k q^T in register tiles (a query's max over the keys an elementwise
max), then per chunk of keys the exponentials and v^T p^T, while the chunk is in L1. PyTorch's flash kernel calls
MKL's GEMM per block and runs the softmax apart; the brgemm kernel (cpu_attention_native.py) has a max pass and
pads a head dim of 40 to 48 in p v.

Offered for head dims that are multiples of 8 up to MAX_HEAD_DIM, and used where it builds and its self-test keeps
SDPA's error (within 2x, against fp64); else `unavailable()` says why and the cpu backend runs the brgemm kernel or
SDPA. `FASTSD_CPU_NATIVE=0` never builds or uses it.
"""
from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from fastsd import cpuinfo
from fastsd.backends import cpu_native

SOURCE = Path(__file__).with_suffix(".cpp")
FLAGS = {"avx2": cpu_native.BASE_FLAGS + cpu_native.AVX2, "avx512": cpu_native.BASE_FLAGS + ("-mavx512f", "-mfma")}
NEEDS = {"avx2": {"avx2", "fma"}, "avx512": {"avx512f", "fma"}}  # CPU flags each build needs
VERSION = 2  # part of the tuner's key (with the ISA's name)
BLOCK_M = {"avx2": 24, "avx512": 48}  # queries per block: 3 vectors, the only block size each build takes
CHUNK_K = 64  # keys per chunk (64-256 ran alike; 64 the smallest error)
MAX_HEAD_DIM = 160  # as the brgemm kernel: beyond (the VAE's 512) SDPA
DEFAULT_MAX_HEAD_DIM = 80  # the cpu backend's default up to here (faster than SDPA at 40 and 80, not at 160 on AVX2: docs/cpu-path.md)
_I64, _PTR = ctypes.c_int64, ctypes.c_void_p
_ARGS = [_PTR, _I64, _I64, _I64] * 4 + [_I64] * 5 + [ctypes.c_float, _I64, _I64, ctypes.c_int]
_ERRORS = {1: "arguments it has no code for", 2: "out of memory"}


@functools.cache
def isa() -> str | None:
    """The kernel for the vector ISA ATen runs here ("avx2", "avx512"), None where neither is in effect. (Fixed for
    the process: ATen reads its restriction at start.)"""
    name = {"AVX2": "avx2", "AVX512": "avx512"}.get(cpuinfo.aten_capability())
    return name if name and NEEDS[name] <= set(cpuinfo.cpu_flags()) else None


def build(name: str | None = None, cxx: str | None = None, folder: Path | None = None) -> Path:
    name = name or isa()
    return cpu_native.build(SOURCE, FLAGS[name], torch_api=False, cxx=cxx, folder=folder)


def offered_here() -> str | None:
    """Why this CPU doesn't get a kernel (None when it does): AVX2 + FMA or AVX-512 in effect."""
    return None if isa() else f"for CPUs running AVX2 or AVX-512 (this one runs {cpuinfo.aten_capability()})"


@functools.cache
def _library() -> tuple[ctypes.CDLL | None, str | None]:
    if cpu_native.disabled():
        return None, f"{cpu_native.ENV}=0"
    why = offered_here()
    if why:
        return None, why
    return cpu_native.load_checked(build, _declare, _self_test)


def _declare(lib: ctypes.CDLL) -> None:
    lib.fastsd_attention_fp32.argtypes = _ARGS
    lib.fastsd_attention_fp32.restype = ctypes.c_int


def unavailable() -> str | None:
    """Why the kernel can't run here (None when it can). Builds it on the first call."""
    return _library()[1]


def covers(q: torch.Tensor) -> bool:
    return q.dtype == torch.float32 and covers_head_dim(q.shape[-1])


def covers_head_dim(d: int) -> bool:
    return d % 8 == 0 and 8 <= d <= MAX_HEAD_DIM


def _run(lib, q, k, v, scale: float | None) -> torch.Tensor:
    b, h, lq, d = q.shape
    lk = k.shape[2]
    if not covers(q) or k.dtype != q.dtype or v.dtype != q.dtype or lk == 0:
        raise ValueError(f"fp32 attention kernel takes fp32 q, k, v, head dims multiple of 8 up to {MAX_HEAD_DIM} "
                         "and at least one key")
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    out = torch.empty(b, lq, h, d, dtype=q.dtype).transpose(1, 2)  # (B, L, H, D) memory, as the native kernel
    args = []
    for t in (q, k, v, out):
        args += [t.data_ptr(), t.stride(0), t.stride(1), t.stride(2)]
    scale = d ** -0.5 if scale is None else scale
    rc = lib.fastsd_attention_fp32(*args, b, h, lq, lk, d, scale, BLOCK_M[isa()], CHUNK_K, torch.get_num_threads())
    if rc != 0:
        raise RuntimeError(f"fp32 attention kernel failed: {_ERRORS.get(rc, rc)}")
    return out


def _self_test(lib) -> None:
    """Odd query and key counts (a partial block, a partial key panel or tile), strided (B, L, H, D) views, head dims
    8, 40 and 80: within 2x of SDPA's error against fp64 attention on the same inputs."""
    sdpa = torch.nn.functional.scaled_dot_product_attention
    g = torch.Generator().manual_seed(0)
    for d in (8, 40, 80):
        q, k, v = (torch.randn(2, n, 3, d, generator=g).transpose(1, 2) for n in (BLOCK_M[isa()] + 7, 77, 77))
        ref = sdpa(q.double(), k.double(), v.double())
        rel = lambda o: ((o.double() - ref).norm() / ref.norm()).item()  # noqa: E731
        ours, torch_err = rel(_run(lib, q, k, v, None)), rel(sdpa(q, k, v))
        if not ours <= 2 * torch_err:
            raise RuntimeError(f"the self-test failed at head dim {d} (error {ours:.2e}, SDPA's {torch_err:.2e})")


def attention_fp32(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None) -> torch.Tensor:
    """q (B, H, Lq, D), k/v (B, H, Lk, D), fp32, D a multiple of 8 up to MAX_HEAD_DIM -> (B, H, Lq, D), non-causal;
    any strides."""
    lib, why = _library()
    if lib is None:
        raise RuntimeError(f"fp32 attention kernel unavailable: {why}")
    return _run(lib, q, k, v, scale)
