"""A bf16 layer's Winograd F(2x2) convolution with bf16 operands in one native call (cpu_winograd_bf16.cpp): the
transformed tiles and weight rounded to bf16, products and sums in fp32, at the CPU's bf16 GEMM rate; by blocks of
tiles whose transformed tiles and products stay in cache.

cpu_winograd's other variants run a bf16 layer's GEMMs in fp32; where AVX512-BF16's dot products run at about
twice fp32's rate (Zen 4/5) this one does F(2x2)'s 2.25x fewer multiplications than a direct convolution at the
bf16 rate, for 1.7x the error of torch's own bf16 convolution (within the kernels' 2x; F(4x4)'s larger transform
factors would make it ~9x, and F(3x3)'s ~5x, so they are not offered). PyTorch has no CPU bf16 GEMM with an fp32
output in Python; ATen's C++ `cpublas::brgemm` (oneDNN's micro-kernel) has one, so this is C++ compiled on this
machine at first use (cpu_native.py), used where it loads and passes a self-test; `cpublas::brgemm` is a private
ATen API: the build and the self-test are its capability check. Offered on CPUs with native bf16 only (below it
oneDNN has no bf16 micro-kernel); `FASTSD_CPU_NATIVE=0` never builds or uses it.
"""
from __future__ import annotations

import ctypes
import functools
import math
from pathlib import Path

import torch

from fastsd import cpuinfo
from fastsd.backends import cpu_native

SOURCE = Path(__file__).with_suffix(".cpp")
VERSION = 2  # part of the tuner's key for convolutions offered it (2: one call; 1 was three passes)
BLOCK_T, BLOCK_N = 64, 64  # tiles per block (at most), output channels per micro-kernel call
FLAGS = cpu_native.BASE_FLAGS + cpu_native.AVX512
_I64, _PTR = ctypes.c_int64, ctypes.c_void_p
_CONV_ARGS = [_PTR] + [_I64] * 7 + [_PTR, _I64, _PTR, _PTR] + [_I64] * 3 + [ctypes.c_int, ctypes.c_int]


def build(cxx: str | None = None, folder: Path | None = None) -> Path:
    return cpu_native.build(SOURCE, FLAGS, torch_api=True, cxx=cxx, folder=folder)


def _declare(lib: ctypes.CDLL) -> None:
    lib.fastsd_winograd_conv_bf16.argtypes = _CONV_ARGS
    lib.fastsd_winograd_conv_bf16.restype = ctypes.c_int
    lib.fastsd_winograd_bf16_error.restype = ctypes.c_char_p


@functools.cache
def _library() -> tuple[ctypes.CDLL | None, str | None]:
    if cpu_native.disabled():
        return None, f"{cpu_native.ENV}=0"
    if not cpuinfo.native_bf16():
        return None, f"needs native bf16 (AVX512-BF16 or AMX; this CPU runs {cpuinfo.aten_capability()})"
    return cpu_native.load_checked(build, _declare, _self_test)


def unavailable() -> str | None:
    """Why the bf16 convolution can't run here (None when it can). Builds it on the first call."""
    return _library()[1]


def library():
    """The loaded library, or None where it is unavailable."""
    return _library()[0]


def layout(u: torch.Tensor) -> torch.Tensor:
    """(P, C, K) -> (P, C2 * K) bf16, C2 = C rounded up to even (a zero row pads odd C): per position, for each block
    of BLOCK_N output channels (the last one narrower) its (C2/2, width, 2) panel, C pair-interleaved as the
    micro-kernel takes it, contiguous (a panel is read whole, in order). The layout of
    cpu_winograd.weight_transform's result for F2B (which makes it without this copy)."""
    p, c, k = u.shape
    u = u.to(torch.bfloat16)
    if c % 2:
        u = torch.cat([u, u.new_zeros(p, 1, k)], 1)
    u = u.view(p, -1, 2, k)
    return torch.cat([u[..., j:j + BLOCK_N].transpose(2, 3).reshape(p, -1) for j in range(0, k, BLOCK_N)], 1)


def conv(lib, x: torch.Tensor, u: torch.Tensor, bias: torch.Tensor | None, cvt: bool = True,
         block_t: int | None = None, groups: int | None = None) -> torch.Tensor:
    """F.conv2d(x, w, bias, padding=1) for bf16 x (N, C, H, W) and u = cpu_winograd.weight_transform(w, F2B)
    (`layout`), by F(2x2) with bf16 operands; bf16, channels_last. The tiles in near-equal blocks of at most BLOCK_T
    (`block_t`), the output channels in `groups` where there are few blocks for the threads (each group transforms
    its tiles again).
    cvt=False: integer rounding even where the CPU has AVX512-BF16's conversion (the same result: for tests)."""
    n, c, h, w = x.shape
    c2 = (c + 1) // 2 * 2
    k = u.shape[1] // c2 if u.dim() == 2 else 0
    if x.dtype != torch.bfloat16 or u.dtype != torch.bfloat16 or u.shape != (16, c2 * k) or k < 1 \
            or not u.is_contiguous():
        raise ValueError("the bf16 Winograd convolution takes bf16 x (N, C, H, W) and contiguous bf16 u "
                         "(16, C2 * K) (`layout`)")
    xh = x.permute(0, 2, 3, 1)
    if xh.stride(3) != 1:
        xh = xh.contiguous()
    b = None if bias is None else bias.to(torch.float32).contiguous()
    out = torch.empty(n, h, w, k, dtype=torch.bfloat16)
    threads = torch.get_num_threads()
    tiles = n * -(-h // 2) * -(-w // 2)
    blocks = -(-tiles // (block_t or BLOCK_T))
    if groups is None:  # items in a multiple of the threads where blocks are few
        groups = 1 if blocks >= 8 * threads else threads // math.gcd(blocks, threads)
    rc = lib.fastsd_winograd_conv_bf16(xh.data_ptr(), n, h, w, c, *xh.stride()[:3], u.data_ptr(), k,
                                       None if b is None else b.data_ptr(), out.data_ptr(), -(-tiles // blocks),
                                       BLOCK_N, groups, threads, int(cvt))
    if rc != 0:
        raise RuntimeError(f"bf16 Winograd convolution failed: "
                           f"{lib.fastsd_winograd_bf16_error().decode(errors='replace')}")
    return out.permute(0, 3, 1, 2)


def _self_test(lib) -> None:
    """Odd channels (a padded pair), odd sizes, a bias, output channels beyond a block, several blocks of tiles in
    groups, both conversions (the same bits): against an fp64 convolution of the same bf16 data, within a few times
    bf16's rounding (F2B's own error; a layout or indexing fault is far above it)."""
    from fastsd.backends import cpu_winograd

    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 71, 19, 13, generator=g).bfloat16()
    w = (torch.randn(BLOCK_N + 3, 71, 3, 3, generator=g) / 25).bfloat16()
    b = torch.randn(BLOCK_N + 3, generator=g).bfloat16()
    ref = torch.nn.functional.conv2d(x.double(), w.double(), b.double(), padding=1)
    u = cpu_winograd.weight_transform(w, cpu_winograd.F2B)
    ys = [conv(lib, x, u, b, cvt, block_t=16, groups=2) for cvt in (True, False)]
    err = ((ys[0].double() - ref).norm() / ref.norm()).item()
    if not (err < 2e-2 and torch.equal(ys[0], ys[1])):
        raise RuntimeError(f"the self-test failed (error {err:.1e} against fp64 on the same bf16 data)")
