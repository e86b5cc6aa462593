"""Winograd's input and output transforms (cpu_winograd.py) as native code (cpu_winograd_native.cpp): one pass each
over the data, separable, a block of channels at a time, instead of PyTorch's pad + gather copy + kron GEMM
(input) and kron GEMM + bias add + crop copy (output); the matrices written out with their common terms, not
multiplied entry by entry. Plain C++ and OpenMP, compiled for the vector ISA ATen runs
(cpu_native.py), used where it builds and its self-test matches the torch-ops transforms; else `unavailable()`
says why and cpu_winograd keeps those. `FASTSD_CPU_NATIVE=0` never builds or uses it.
"""
from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from fastsd.backends import cpu_native

SOURCE = Path(__file__).with_suffix(".cpp")
VERSION = 2  # part of the tuner's key for convolutions with a Winograd candidate
_I64, _PTR, _INT = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
_INPUT_ARGS = [_INT, _PTR] + [_I64] * 12 + [_PTR, _INT]
_OUTPUT_ARGS = [_INT, _PTR, _I64, _PTR, _PTR] + [_I64] * 6 + [_INT]


def build(cxx: str | None = None, folder: Path | None = None) -> Path:
    return cpu_native.build(SOURCE, cpu_native.BASE_FLAGS + cpu_native.isa_flags(), torch_api=False, cxx=cxx,
                            folder=folder)


@functools.cache
def _library() -> tuple[ctypes.CDLL | None, str | None]:
    return cpu_native.load_checked(build, _declare, _self_test)


def _declare(lib: ctypes.CDLL) -> None:
    lib.fastsd_winograd_input.argtypes = _INPUT_ARGS
    lib.fastsd_winograd_output.argtypes = _OUTPUT_ARGS


def unavailable() -> str | None:
    """Why the native transforms can't run here (None when they can). Builds them on the first call."""
    return _library()[1]


def _check(rc: int) -> None:
    if rc != 0:
        raise RuntimeError("native Winograd transform: a tile size or range it has no code for")


def _fp32(*tensors: torch.Tensor) -> None:
    if any(t.dtype != torch.float32 for t in tensors):
        raise ValueError("the native Winograd transforms take fp32 tensors (cpu_winograd.in_fp32 runs bf16 layers)")


def input_transform(lib, xh: torch.Tensor, v, tw: int, row0: int, rows: int, pos0: int, pos_rows: int,
                    t: torch.Tensor) -> None:
    """t[(i - pos0) * a + j, tile, c] = (B^T d B)[i, j] of each input tile d (zero beyond the border) of the
    tile rows row0..row0+rows (all tw columns, every image), for the transformed rows i in pos0..pos0+pos_rows.
    xh: NHWC fp32, channel stride 1; t: contiguous (pos_rows * a, n * rows * tw, c)."""
    _fp32(xh, t)
    n, h, w, c = xh.shape
    _check(lib.fastsd_winograd_input(v.a, xh.data_ptr(), n, h, w, c, *xh.stride()[:3], tw, row0,
                                     rows, pos0, pos_rows, t.data_ptr(), torch.get_num_threads()))


def output_transform(lib, prod: torch.Tensor, v, bias: torch.Tensor | None, out: torch.Tensor, tw: int, row0: int,
                     rows: int) -> None:
    """out[img, y, x, :] (+ bias) for the output pixels of tile rows row0..row0+rows from prod (a*a, tiles, k):
    A^T P A per tile, the pixels beyond out's border dropped. out: contiguous NHWC fp32."""
    _fp32(prod, out, *(() if bias is None else (bias,)))
    n, h, w, k = out.shape
    _check(lib.fastsd_winograd_output(v.a, prod.data_ptr(), k,
                                      None if bias is None else bias.data_ptr(), out.data_ptr(), n, h, w, tw, row0,
                                      rows, torch.get_num_threads()))


def _self_test(lib) -> None:
    """Both tile sizes, odd sizes and channel counts (a block and a remainder), a strided batch, with and without
    bias, transformed rows in two parts: the same as the torch-ops transforms to fp32 rounding."""
    from fastsd.backends import cpu_winograd as W
    g = torch.Generator().manual_seed(0)
    for v in (W.F4, W.F2):  # (the transforms of W.F2B are W.F2's)
        for bias in (True, False):
            x = torch.randn(2, 71, 13, 11, generator=g)[:, :, :, 1:]  # (2, 71, 13, 10), non-contiguous
            w = torch.randn(67, 71, 3, 3, generator=g)
            b = torch.randn(67, generator=g) if bias else None
            u = W.weight_transform(w, v)
            ours = W.conv3x3_native(lib, x, u, b, v, pos_chunk=2)
            ref = W.conv3x3_torch(x, u, b, v)
            err = ((ours - ref).norm() / ref.norm()).item()
            if ours.shape != ref.shape or not err < 1e-5:
                raise RuntimeError(f"the self-test failed ({v.name}: {err:.1e} from the torch-ops transforms)")


def library():
    """The loaded library, or None where it is unavailable."""
    return _library()[0]
