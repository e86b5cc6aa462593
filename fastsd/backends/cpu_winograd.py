"""3x3 convolutions (stride 1, padding 1) as Winograd F(4x4, 3x3) for fp32 on a CPU: a quarter of the
multiplications of a direct convolution (36 per 4x4 output tile instead of 144), in 36 GEMMs.

    y = A^T [ (G g G^T) . (B^T d B) ] A     (Lavin & Gray 2015; interpolation points 0, +-1, +-2, infinity)

The input tiles (6x6, overlapping by 2) are transformed with one small GEMM by kron(B^T, B^T), multiplied
per transformed position (a batched GEMM against the weight transformed once, `weight_transform`), and
transformed back with kron(A^T, A^T). All in fp32: the transforms grow values up to ~100x (the points +-2
give factors 4, 5 and 8), so in fp32 the error is a few times a direct convolution's (tests/test_cpu_paths.py
bounds it), and it is not used for bf16.

It trades memory for time: the transformed weight is 4x the weight's size, kept beside the weight (which
stays for LoRA merges and state_dict) by a layer that `cpu_tune` measured faster this way at its shape
(cpu_pack.PackableConv2d), offered only from MIN_TILES output tiles up. FASTSD_CPU_WINOGRAD=0 never offers it.
"""
from __future__ import annotations

import math
import os
from fractions import Fraction as Fr

import torch
import torch.nn.functional as F
from torch import nn

ENV = "FASTSD_CPU_WINOGRAD"
M, R = 4, 3  # output tile, kernel
A = M + R - 1  # input tile (6)
CHUNK_BYTES = 32 << 20  # transformed input tiles per chunk
MIN_TILES = 64  # output tiles per image (32x32 px and up): below, a 4x copy of the weight buys little time

_BT = [[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
       [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]]
_G = [[Fr(1, 4), 0, 0], [Fr(-1, 6), Fr(-1, 6), Fr(-1, 6)], [Fr(-1, 6), Fr(1, 6), Fr(-1, 6)],
      [Fr(1, 24), Fr(1, 12), Fr(1, 6)], [Fr(1, 24), Fr(-1, 12), Fr(1, 6)], [0, 0, 1]]
_AT = [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]]


def _f64(rows) -> torch.Tensor:
    return torch.tensor([[float(v) for v in r] for r in rows], dtype=torch.float64)


BT, G, AT = _f64(_BT), _f64(_G), _f64(_AT)
W_T = torch.kron(G, G).float()  # (36, 9): a flattened 3x3 kernel (row-major) -> its transform
IN_T = torch.kron(BT, BT).float()  # (36, 36): a flattened 6x6 tile -> its transform
OUT_T = torch.kron(AT, AT).float()  # (16, 36): a transformed 6x6 product -> the 4x4 output tile


def applies(conv: nn.Conv2d, x: torch.Tensor) -> bool:
    """Whether `conv` on `x` is a case this covers (fp32, 3x3, stride 1, padding 1, no dilation or groups)
    and worth a try (at least MIN_TILES output tiles per image), and FASTSD_CPU_WINOGRAD is not 0."""
    return (os.environ.get(ENV) != "0" and x.dtype == torch.float32 and x.dim() == 4
            and tuple(conv.kernel_size) == (R, R) and tuple(conv.stride) == (1, 1) and tuple(conv.padding) == (1, 1)
            and tuple(conv.dilation) == (1, 1) and conv.groups == 1
            and math.prod(tile_counts(*x.shape[2:])) >= MIN_TILES)


def tile_counts(h: int, w: int) -> tuple[int, int]:
    """Output tiles per column and per row of an h x w output (the last ones cut by the border)."""
    return -(-h // M), -(-w // M)


def weight_transform(w: torch.Tensor) -> torch.Tensor:
    """(K, C, 3, 3) fp32 weight -> (36, C, K) G g G^T per (K, C) pair, flattened: a view of a (K, 36, C)
    tensor (K GEMMs of (36, 9) x (9, C), no copy of the weight when it is channels_last; the batched GEMM
    takes the transposed operand as it is)."""
    k, c = w.shape[:2]
    return torch.matmul(W_T, w.detach().permute(0, 2, 3, 1).reshape(k, R * R, c)).permute(1, 2, 0)


def conv3x3(x: torch.Tensor, u: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.conv2d(x, w, bias, padding=1) for u = weight_transform(w); the result is channels_last. Rows of
    tiles go through in chunks whose transformed tiles take <= CHUNK_BYTES (a VAE's 512x512 layers)."""
    n, c, h, w = x.shape
    k = u.shape[-1]
    th, tw = tile_counts(h, w)
    xp = F.pad(x.permute(0, 2, 3, 1), (0, 0, 1, 1 + tw * M - w, 1, 1 + th * M - h))  # NHWC, zero border
    out = torch.empty(n, th, M, tw, M, k, dtype=x.dtype)
    step = max(1, CHUNK_BYTES // (A * A * n * tw * max(c, k) * x.element_size()))  # tile rows per chunk
    for r in range(0, th, step):
        rows = min(step, th - r)
        tiles = xp[:, r * M:(r + rows) * M + R - 1].unfold(1, A, M).unfold(2, A, M)  # (n, rows, tw, c, 6, 6)
        d = tiles.permute(4, 5, 0, 1, 2, 3).reshape(A * A, -1)  # (36, n*rows*tw*c): the one gather copy
        v = torch.mm(IN_T, d).view(A * A, -1, c)  # (36, tiles, c)
        prod = torch.bmm(v, u)  # (36, tiles, k)
        y = torch.mm(OUT_T, prod.view(A * A, -1)).view(M, M, n, rows, tw, k).permute(2, 3, 0, 4, 1, 5)
        if bias is not None:
            torch.add(y, bias, out=out[:, r:r + rows])
        else:
            out[:, r:r + rows] = y
    out = out.view(n, th * M, tw * M, k)
    if th * M != h or tw * M != w:
        out = out[:, :h, :w].contiguous()
    return out.permute(0, 3, 1, 2)
