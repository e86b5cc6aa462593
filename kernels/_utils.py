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
    """True when Triton runs kernels with its CPU interpreter (TRITON_INTERPRET=1, read at import by triton)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def interpreted(device: torch.device) -> bool:
    """Whether a launch on `device` runs in Triton's CPU interpreter: exactly when the tensors are on the CPU.
    The interpreter-only workarounds (UPCAST_DOT, BF16_FIX) are keyed on this, never on the environment, so
    a CUDA (or meta, for the AOT report) launch plan never carries them."""
    return torch.device(device).type == "cpu"


SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_dtype(name: str, t: torch.Tensor) -> None:
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name}: dtype {t.dtype} not supported (float32, float16, bfloat16)")


def check_runnable(op: str, device: torch.device) -> None:
    if interpreted(device) and not interpreter_enabled():
        raise RuntimeError(f"kernels.{op} on CPU tensors needs the Triton interpreter (TRITON_INTERPRET=1)")


def launch(plan, device: torch.device) -> None:
    """Run one (kernel, grid, args, constexprs, options) launch plan; the interpreter ignores warps/stages."""
    kernel, grid, args, constexprs, options = plan
    kernel[grid](*args, **constexprs, **({} if interpreted(device) else options))


def aligned16(*tensors: torch.Tensor, strides: int = 3) -> bool:
    """Host proof for 16-byte vector access hints: every pointer 16-byte aligned, the last dim contiguous and
    the first `strides` strides multiples of 8 elements (16 bytes for fp16/bf16, 32 for fp32)."""
    for t in tensors:
        if t.data_ptr() % 16 or t.stride(-1) != 1:
            return False
        if any(s % 8 for s in t.stride()[:strides]):
            return False
    return True


# --- Triton helpers ---
def interpreter_bf16_fix(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether casts to bf16 must go through `cast_rtne`: Triton 3.9's interpreter converts fp32 ->
    bf16 by truncating the mantissa (runtime/interpreter.py `_convert_float` with no rounding mode),
    while the GPU rounds to nearest even. False for every non-CPU launch."""
    return interpreted(device) and dtype == torch.bfloat16


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
