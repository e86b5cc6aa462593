"""GEGLU's elementwise half, h * GELU(gate) (exact GELU), as native code (cpu_geglu.cpp): one pass over the
projection's output writing the product once, where PyTorch's F.gelu writes GELU(gate) and the multiply reads it
again. fp32 and bf16 (fp32 math, rounded once). Plain C++ and OpenMP, compiled for the vector ISA ATen runs
(cpu_native.py), used where it builds and its self-test keeps PyTorch's error (against fp64); else `unavailable()`
says why and the cpu backend keeps torch's ops. `FASTSD_CPU_NATIVE=0` never builds or uses it.
"""
from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch
import torch.nn.functional as F

from fastsd.backends import cpu_native

SOURCE = Path(__file__).with_suffix(".cpp")
VERSION = 1  # part of the tuner's key
_I64, _PTR = ctypes.c_int64, ctypes.c_void_p
_ARGS = [ctypes.c_int, _PTR, _I64, _I64, _I64, _PTR, _I64, ctypes.c_int]


def build(cxx: str | None = None, folder: Path | None = None) -> Path:
    return cpu_native.build(SOURCE, cpu_native.BASE_FLAGS + cpu_native.FAST_MATH + cpu_native.isa_flags(),
                            torch_api=False, cxx=cxx, folder=folder)


@functools.cache
def _library() -> tuple[ctypes.CDLL | None, str | None]:
    return cpu_native.load_checked(build, _declare, _self_test)


def _declare(lib: ctypes.CDLL) -> None:
    lib.fastsd_geglu.argtypes = _ARGS
    lib.fastsd_geglu.restype = ctypes.c_int


def unavailable() -> str | None:
    """Why the native GEGLU can't run here (None when it can). Builds it on the first call."""
    return _library()[1]


def covers(p: torch.Tensor) -> bool:
    """fp32 or bf16, at least 1-D, an even last dimension with unit stride, rows a single stride apart."""
    if p.dtype not in (torch.float32, torch.bfloat16) or p.dim() == 0 or p.shape[-1] % 2 or p.stride(-1) != 1:
        return False
    try:
        p.view(-1, p.shape[-1])
    except RuntimeError:
        return False
    return True


def _run(lib, p: torch.Tensor) -> torch.Tensor:
    if not covers(p):
        raise ValueError("native GEGLU takes fp32 or bf16 rows of even width with unit stride")
    n = p.shape[-1] // 2
    flat = p.view(-1, 2 * n)
    out = torch.empty(*p.shape[:-1], n, dtype=p.dtype)
    rc = lib.fastsd_geglu(int(p.dtype == torch.bfloat16), flat.data_ptr(), flat.shape[0], n,
                          flat.stride(0) if flat.shape[0] > 1 else 2 * n, out.data_ptr(), n, torch.get_num_threads())
    if rc != 0:
        raise RuntimeError("native GEGLU: arguments it has no code for")
    return out


def geglu_native(p: torch.Tensor) -> torch.Tensor:
    """h * F.gelu(gate) for h, gate = p.chunk(2, dim=-1): fp32 or bf16 p, a new contiguous tensor."""
    lib, why = _library()
    if lib is None:
        raise RuntimeError(f"native GEGLU unavailable: {why}")
    return _run(lib, p)


def geglu_torch(p: torch.Tensor) -> torch.Tensor:
    """What the native GEGLU computes, in torch ops (GELU(gate) then the product in place)."""
    h, gate = p.chunk(2, dim=-1)
    return F.gelu(gate).mul_(h)


def reference_error(out: torch.Tensor, p: torch.Tensor) -> float:
    """Relative error of `out` against fp64 h * GELU(gate) of the same input."""
    h, gate = p.double().chunk(2, dim=-1)
    ref = h * F.gelu(gate)
    return ((out.double() - ref).norm() / ref.norm()).item()


def _self_test(lib) -> None:
    """Both dtypes, an odd width and row count, gates from -12 to 12 (GELU's tails): within 2x of PyTorch's own
    error."""
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        p = torch.randn(37, 2 * 1029, generator=g) * 3
        p[:, 1029:1029 + 25] = torch.linspace(-12, 12, 25)
        p = p.to(dtype)
        ours, theirs = reference_error(_run(lib, p), p), reference_error(geglu_torch(p), p)
        if not ours <= 2 * theirs:
            raise RuntimeError(f"the self-test failed ({str(dtype)[6:]}: error {ours:.2e}, PyTorch's {theirs:.2e})")
