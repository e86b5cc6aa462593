"""GroupNorm (+ SiLU) over channels-last activations as native code (cpu_group_norm.cpp): statistics in one pass,
the normalisation and the SiLU in a second that writes once, where PyTorch's CPU GroupNorm writes its output and
SiLU reads and writes it again. fp32 and bf16 (fp32 math, rounded once). Plain C++ and OpenMP, compiled for the
vector ISA ATen runs (cpu_native.py), used where it builds and its self-test keeps PyTorch's error (against fp64);
else `unavailable()` says why and the cpu backend keeps torch's ops. `FASTSD_CPU_NATIVE=0` never builds or uses it.
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
_ARGS = [ctypes.c_int, _PTR, _PTR, _PTR, _PTR, _I64, _I64, _I64, _I64, ctypes.c_float, ctypes.c_int, ctypes.c_int]


def build(cxx: str | None = None, folder: Path | None = None) -> Path:
    return cpu_native.build(SOURCE, cpu_native.BASE_FLAGS + cpu_native.FAST_MATH + cpu_native.isa_flags(),
                            torch_api=False, cxx=cxx, folder=folder)


@functools.cache
def _library() -> tuple[ctypes.CDLL | None, str | None]:
    return cpu_native.load_checked(build, _declare, _self_test)


def _declare(lib: ctypes.CDLL) -> None:
    lib.fastsd_group_norm.argtypes = _ARGS
    lib.fastsd_group_norm.restype = ctypes.c_int


def unavailable() -> str | None:
    """Why the native GroupNorm can't run here (None when it can). Builds it on the first call."""
    return _library()[1]


def covers(x: torch.Tensor, num_groups: int) -> bool:
    """fp32 or bf16, 4-D channels-last contiguous (the cpu backend's layout), groups dividing the channels."""
    return (x.dtype in (torch.float32, torch.bfloat16) and x.dim() == 4 and x.numel() > 0
            and x.shape[1] % num_groups == 0 and x.is_contiguous(memory_format=torch.channels_last))


def _run(lib, x, num_groups, weight, bias, eps, silu) -> torch.Tensor:
    if not covers(x, num_groups):
        raise ValueError("native GroupNorm takes 4-D channels-last fp32 or bf16 input, groups dividing the channels")
    n, c, h, w = x.shape
    wf = None if weight is None else weight.detach().float().contiguous()
    bf = None if bias is None else bias.detach().float().contiguous()
    out = torch.empty_like(x, memory_format=torch.channels_last)
    rc = lib.fastsd_group_norm(int(x.dtype == torch.bfloat16), x.data_ptr(), None if wf is None else wf.data_ptr(),
                               None if bf is None else bf.data_ptr(), out.data_ptr(), n, h * w, c, num_groups,
                               eps, int(silu), torch.get_num_threads())
    if rc != 0:
        raise RuntimeError("native GroupNorm: arguments it has no code for")
    return out


def group_norm_native(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None, *,
                      eps: float = 1e-5, silu: bool = False) -> torch.Tensor:
    """F.group_norm (then SiLU when asked) of a channels-last fp32/bf16 x, statistics in fp32 and wider."""
    lib, why = _library()
    if lib is None:
        raise RuntimeError(f"native GroupNorm unavailable: {why}")
    return _run(lib, x, num_groups, weight, bias, eps, silu)


def reference_error(out: torch.Tensor, x: torch.Tensor, num_groups: int, weight, bias, eps: float, silu: bool) -> float:
    """Relative error of `out` against fp64 GroupNorm (+ SiLU) of the same inputs."""
    ref = F.group_norm(x.double(), num_groups, None if weight is None else weight.double(),
                       None if bias is None else bias.double(), eps)
    ref = F.silu(ref) if silu else ref
    return ((out.double() - ref).norm() / ref.norm()).item()


def _self_test(lib) -> None:
    """Both dtypes, with and without SiLU and weight, odd sizes, a large mean: within 2x of PyTorch's own error."""
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        for silu, affine, offset in ((True, True, 0.0), (False, False, 50.0)):
            x = (torch.randn(2, 24, 7, 5, generator=g) * 2 + offset).to(dtype).to(memory_format=torch.channels_last)
            w, b = (torch.randn(24, generator=g), torch.randn(24, generator=g)) if affine else (None, None)
            torch_out = F.group_norm(x, 4, None if w is None else w.to(dtype), None if b is None else b.to(dtype), 1e-5)
            torch_out = F.silu(torch_out) if silu else torch_out
            ours = reference_error(_run(lib, x, 4, w, b, 1e-5, silu), x, 4, w, b, 1e-5, silu)
            theirs = reference_error(torch_out, x, 4, w, b, 1e-5, silu)
            if not ours <= 2 * theirs:
                raise RuntimeError(f"the self-test failed ({str(dtype)[6:]}: error {ours:.2e}, PyTorch's {theirs:.2e})")
