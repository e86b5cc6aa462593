"""Small helpers shared by the kernels in this package."""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= n (1 for n <= 1)."""
    n = int(n)
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-int(a) // int(b))


def round_up(a: int, b: int) -> int:
    return cdiv(a, b) * b


def interpreter_enabled() -> bool:
    """True when Triton runs kernels with its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_dtype(name: str, t: torch.Tensor) -> None:
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name}: dtype {t.dtype} not supported (float32, float16, bfloat16)")


# --- Triton helpers ---
def interpreter_bf16_fix(dtype: torch.dtype) -> bool:
    """Whether casts to bf16 must go through `cast_rtne`: Triton 3.9's interpreter converts fp32 ->
    bf16 by truncating the mantissa (runtime/interpreter.py `_convert_float` with no rounding mode),
    while the GPU rounds to nearest even. Always False outside the interpreter."""
    return interpreter_enabled() and dtype == torch.bfloat16


@triton.jit
def cast_rtne(x, dtype: tl.constexpr, BF16_FIX: tl.constexpr):
    """x.to(dtype); with BF16_FIX (interpreter + bf16 only) an explicit round-to-nearest-even
    fp32 -> bf16 by bit arithmetic, which is what the GPU's cvt.rn.bf16.f32 does."""
    if BF16_FIX:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = bits + (0x7FFF + ((bits >> 16) & 1)).to(tl.uint32)
        y = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        y = x.to(dtype)
    return y
