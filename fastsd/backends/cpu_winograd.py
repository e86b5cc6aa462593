"""3x3 convolutions (stride 1, padding 1) as Winograd F(m x m, 3x3) for fp32 on a CPU: fewer multiplications
than a direct convolution (144 per 4x4 output tile), in (m+2)^2 GEMMs. Two tile sizes:

- F(4x4, 3x3) ("winograd"): 36 multiplications per 4x4 output tile, from 32x32 px up;
- F(2x2, 3x3) ("winograd2"): 16 per 2x2 tile (64 per 4x4), from 16x16 px up to where F(4x4) takes over.

    y = A^T [ (G g G^T) . (B^T d B) ] A     (Lavin & Gray 2015; F(4x4): points 0, +-1, +-2, infinity;
                                               F(2x2): 0, +-1, infinity)

The input tiles (m+2 square, overlapping by 2) are transformed, multiplied per transformed position (a batched
GEMM against the weight transformed once, `weight_transform`), and transformed back: the transforms as one pass
each of native code (cpu_winograd_native.py) where it builds, else in torch ops, one small GEMM each by
kron(B^T, B^T) and kron(A^T, A^T). All in fp32: F(4x4)'s transforms grow values up to ~100x (the points
+-2 give factors 4, 5 and 8), so its error is a few times a direct convolution's; F(2x2)'s (factors 1 and 1/2)
is below it (tests/test_cpu_paths.py bounds both).

bf16 layers are offered it too on CPUs without AMX, computed the same way in fp32 from the bf16 input and rounded
to bf16 once at the end (so with the error of oneDNN's bf16 convolution, which also sums in fp32): there a bf16
GEMM runs at most about twice fp32's rate (AVX512-BF16's dot products), so a half to a quarter of the
multiplications in fp32 can win; the tuner measures it per layer. Where bf16 is native they are also offered
F(2x2) with bf16 operands in the GEMMs ("winograd2_bf16": transformed tiles and weight rounded to bf16, products
summed in fp32, cpu_winograd_bf16.py): 1.7x torch's own bf16 error, within the kernels' 2x (F(4x4)'s would be ~9x).
With AMX the bf16 convolution is the faster (docs/cpu-path.md has the measurements).

It trades memory for time: the transformed weight is (m+2)^2/9 the weight's size (4x for F(4x4), 1.8x for
F(2x2)), kept beside the weight (which stays for LoRA merges and state_dict) by a layer that `cpu_tune`
measured faster this way at its shape (cpu_pack.PackableConv2d), offered only from MIN_TILES output tiles
up (F(2x2) where F(4x4) has fewer: its transforms move more data per output, and at 32x32 and up F(4x4) is
the faster of the two). F(2x2) is offered where the process may use >= F2_MIN_MEMORY of RAM (docs/cpu-path.md has the
memory each setting took); FASTSD_CPU_WINOGRAD=all offers both anyway, =4x4 only F(4x4), =fp32 no bf16 operands,
=0 none.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
from fractions import Fraction as Fr

import torch
import torch.nn.functional as F
from torch import nn

from fastsd import cpuinfo
from fastsd.backends import cpu_huge_pages, cpu_winograd_bf16, cpu_winograd_native

ENV = "FASTSD_CPU_WINOGRAD"
R = 3  # kernel
CHUNK_BYTES = 32 << 20  # transformed input tiles per chunk
SMALL_CHUNK_BYTES = 16 << 20  # transformed tiles and products per chunk, where that leaves MIN_CHUNK_TILES
MIN_CHUNK_TILES = 512  # output tiles per chunk below which the GEMMs run slower than the cache saves
MIN_TILES = 64  # output tiles per image: below, a copy of the weight 1.8-4x its size buys little time
CONTIGUOUS_FROM_K = 1280  # output channels from which the transformed weight is laid out (a*a, C, K)
F2_MIN_MEMORY = 12 << 30  # RAM below which F(2x2) is not offered unless asked for (SD1.5 fp32: +1.3 GiB peak)


def _f64(rows) -> torch.Tensor:
    return torch.tensor([[float(v) for v in r] for r in rows], dtype=torch.float64)


@dataclasses.dataclass(frozen=True, eq=False)
class Variant:
    """F(m x m, 3x3): its name among a layer's candidates and its transforms, flattened by kron."""
    name: str
    m: int  # output tile
    w_t: torch.Tensor  # (a*a, 9): a flattened 3x3 kernel (row-major) -> its transform
    in_t: torch.Tensor  # (a*a, a*a): a flattened a x a input tile -> its transform
    out_t: torch.Tensor  # (m*m, a*a): a transformed product -> the m x m output tile
    bf16: bool = False  # the GEMMs' operands in bf16 (cpu_winograd_bf16), products in fp32

    @property
    def a(self) -> int:
        """Input tile side."""
        return self.m + R - 1

    @classmethod
    def build(cls, name: str, bt, g, at, bf16: bool = False) -> Variant:
        bt, g, at = _f64(bt), _f64(g), _f64(at)
        return cls(name, at.shape[0], torch.kron(g, g).float(), torch.kron(bt, bt).float(), torch.kron(at, at).float(),
                   bf16)


F4 = Variant.build(
    "winograd",
    bt=[[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
        [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]],
    g=[[Fr(1, 4), 0, 0], [Fr(-1, 6), Fr(-1, 6), Fr(-1, 6)], [Fr(-1, 6), Fr(1, 6), Fr(-1, 6)],
       [Fr(1, 24), Fr(1, 12), Fr(1, 6)], [Fr(1, 24), Fr(-1, 12), Fr(1, 6)], [0, 0, 1]],
    at=[[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]])
F2_MATRICES = dict(bt=[[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]],
                   g=[[1, 0, 0], [Fr(1, 2), Fr(1, 2), Fr(1, 2)], [Fr(1, 2), Fr(-1, 2), Fr(1, 2)], [0, 0, 1]],
                   at=[[1, 1, 1, 0], [0, 1, -1, -1]])
F2 = Variant.build("winograd2", **F2_MATRICES)
F2B = Variant.build("winograd2_bf16", **F2_MATRICES, bf16=True)
VARIANTS = {v.name: v for v in (F4, F2, F2B)}


def variant_for(conv: nn.Conv2d, x: torch.Tensor) -> Variant | None:
    """The Winograd variant in fp32 to try for `conv` on `x`, if any: a case this covers (fp32, or bf16 where oneDNN
    has no AMX; 3x3, stride 1, padding 1, no dilation or groups) with at least MIN_TILES output tiles per image,
    F(4x4) where it has them, else F(2x2); among the variants FASTSD_CPU_WINOGRAD allows (`offered`)."""
    if not covers(conv, x) or (x.dtype == torch.bfloat16 and cpuinfo.amx()):
        return None
    return next((v for v in offered() if not v.bf16 and enough_tiles(x, v)), None)


def variants_for(conv: nn.Conv2d, x: torch.Tensor) -> tuple[Variant, ...]:
    """The Winograd variants to try for `conv` on `x`: variant_for's, and for a bf16 layer (without AMX) F(2x2) with
    bf16 operands where it has MIN_TILES tiles, is offered, and its native convolution runs here."""
    v = variant_for(conv, x)
    fp32 = () if v is None else (v,)
    if (x.dtype != torch.bfloat16 or not covers(conv, x) or cpuinfo.amx() or F2B not in offered()
            or not enough_tiles(x, F2B) or cpu_winograd_bf16.library() is None):
        return fp32
    return (*fp32, F2B)


def covers(conv: nn.Conv2d, x: torch.Tensor) -> bool:
    """Whether `conv` on `x` is a convolution this computes: fp32 or bf16, 3x3, stride 1, padding 1, no dilation or
    groups."""
    return (x.dtype in (torch.float32, torch.bfloat16) and x.dim() == 4
            and tuple(conv.kernel_size) == (R, R) and tuple(conv.stride) == (1, 1) and tuple(conv.padding) == (1, 1)
            and tuple(conv.dilation) == (1, 1) and conv.groups == 1)


def enough_tiles(x: torch.Tensor, v: Variant) -> bool:
    return math.prod(tile_counts(*x.shape[2:], v)) >= MIN_TILES


def offered() -> tuple[Variant, ...]:
    """FASTSD_CPU_WINOGRAD: unset = F(4x4) and F(2x2) with bf16 operands, and F(2x2) in fp32 too where this process
    may use >= F2_MIN_MEMORY of RAM; `all` = the three; `fp32` = unset's without bf16 operands (torch's own bf16
    error); `4x4` = F(4x4) only (32x32 px and up); `0` = none (the least memory)."""
    setting = os.environ.get(ENV, "").strip().lower()
    if setting in ("0", "off", "no", "false"):
        return ()
    if setting == "4x4":
        return (F4,)
    fp32 = (F4,) if setting != "all" and (cpuinfo.memory_bytes() or 0) < F2_MIN_MEMORY else (F4, F2)
    return fp32 if setting == "fp32" else (*fp32, F2B)


def tile_counts(h: int, w: int, v: Variant) -> tuple[int, int]:
    """Output tiles per column and per row of an h x w output (the last ones cut by the border)."""
    return -(-h // v.m), -(-w // v.m)


def weight_transform(w: torch.Tensor, v: Variant, out: torch.Tensor | None = None) -> torch.Tensor:
    """(K, C, 3, 3) weight -> (a*a, C, K) fp32 G g G^T per (K, C) pair, flattened. Below CONTIGUOUS_FROM_K output
    channels K GEMMs of (a*a, 9) x (9, C) into a (K, a*a, C) tensor (no copy of the weight when it is channels_last),
    returned as a view (the batched GEMM takes the transposed operand as it is); from there a contiguous (a*a, C, K)
    tensor (docs/cpu-path.md: MKL's GEMMs of 64-256 rows run faster on it there, slower below), made by one GEMM
    over the weight transposed to (9, C, K) (a transposing copy of the larger result was the slow part). `out`, an
    earlier result of the same shape (a weight this one replaces), is written over: memory already in use, not
    fresh pages to fault in; else the result is on huge pages (cpu_huge_pages). A variant with bf16 operands gets
    the fp32 transform rounded to bf16 and pair-interleaved by blocks of output channels (_paired_transform)."""
    if v.bf16:
        return _paired_transform(w, v, out)
    k, c = w.shape[:2]
    shape = (v.a * v.a, c, k)
    if out is not None and (out.shape != shape or out.dtype != torch.float32):
        out = None
    if k >= CONTIGUOUS_FROM_K:
        rows = w.detach().float().permute(2, 3, 0, 1).reshape(R * R, k, c)
        wt = torch.empty(R * R, c, k)
        for j in range(R * R):  # 2-D transposes: ATen's blocked copy
            wt[j].copy_(rows[j].t())
        if out is None or not out.is_contiguous():
            out = cpu_huge_pages.empty(shape)
        torch.mm(v.w_t, wt.view(R * R, c * k), out=out.view(shape[0], c * k))
        return out
    flat = w.detach().float().permute(0, 2, 3, 1).reshape(k, R * R, c)
    base = None if out is None else out.permute(2, 0, 1)  # the (K, a*a, C) tensor `out` is a view of
    if base is None or not base.is_contiguous():
        base = cpu_huge_pages.empty((k, shape[0], c))
    return torch.matmul(v.w_t, flat, out=base).permute(1, 2, 0)


def _paired_transform(w: torch.Tensor, v: Variant, out: torch.Tensor | None) -> torch.Tensor:
    """weight_transform for a variant with bf16 operands: the fp32 transform rounded once to bf16, in the layout
    cpu_winograd_bf16.conv reads (`cpu_winograd_bf16.layout`): (a*a, C2 * K), C2 = C rounded up to even; per
    position, for each block of cpu_winograd_bf16.BLOCK_N output channels (the last one narrower) its (C2/2, width,
    2) pair-interleaved panel, contiguous. One GEMM by the (a*a, 9) matrix per block, over the weight's block laid
    out (9, C2/2, width, 2), so its result has the layout as it is (a transposing copy of the transformed weight,
    1.8x the weight, was most of the time a LoRA switch spent on it)."""
    k, c = w.shape[:2]
    x = w.detach().permute(2, 3, 1, 0).reshape(R * R, c, k)
    if c % 2:
        x = torch.cat([x, x.new_zeros(R * R, 1, k)], 1)
    c2 = x.shape[1]
    x = x.view(R * R, c2 // 2, 2, k)
    shape = (v.a * v.a, c2 * k)
    if out is None or out.shape != shape or out.dtype != torch.bfloat16:
        out = cpu_huge_pages.empty(shape, torch.bfloat16)
    step = cpu_winograd_bf16.BLOCK_N
    for j in range(0, k, step):
        part = x[..., j:j + step].transpose(2, 3).to(torch.float32, memory_format=torch.contiguous_format, copy=True)
        out[:, j * c2:(j + part.shape[2]) * c2].copy_(torch.mm(v.w_t, part.view(R * R, -1)))
    return out


def conv3x3(x: torch.Tensor, u: torch.Tensor, bias: torch.Tensor | None, v: Variant) -> torch.Tensor:
    """F.conv2d(x, w, bias, padding=1) for u = weight_transform(w, v); the result is channels_last, x's dtype (bf16:
    computed in fp32, the GEMMs' operands in bf16 for a bf16 variant). A bf16 variant (bf16 x) in one native call
    (cpu_winograd_bf16.py); the others with the native transforms where they are available
    (cpu_winograd_native.py), else in torch ops."""
    if v.bf16:
        lib = cpu_winograd_bf16.library()
        if lib is None or x.dtype != torch.bfloat16:
            raise RuntimeError(f"{v.name} takes bf16 input and its native convolution: "
                               f"{cpu_winograd_bf16.unavailable() or x.dtype}")
        return cpu_winograd_bf16.conv(lib, x, u, bias)
    lib = cpu_winograd_native.library()
    return in_fp32(conv3x3_torch if lib is None else functools.partial(conv3x3_native, lib), x, u, bias, v)


def in_fp32(run, x: torch.Tensor, u: torch.Tensor, bias: torch.Tensor | None, v: Variant) -> torch.Tensor:
    """run(x, u, bias, v) (conv3x3_torch, or conv3x3_native with its library) for fp32 x; for bf16 x on fp32 copies
    of x and bias, the result rounded to bf16 once."""
    if x.dtype == torch.float32:
        return run(x, u, bias, v)
    return run(x.float(), u, None if bias is None else bias.float(), v).to(x.dtype)


def implementation(variants: tuple[Variant, ...] = ()) -> str:
    """Which transforms conv3x3 runs here (and the bf16 convolution, for `variants` with a bf16 one): part of the
    tuner's key for a convolution with Winograd candidates."""
    gemms = f" bf16 conv v{cpu_winograd_bf16.VERSION}" if any(v.bf16 for v in variants) else ""
    return ("torch" if cpu_winograd_native.library() is None else f"native v{cpu_winograd_native.VERSION}") + gemms


def _balanced(total: int, most: int) -> int:
    """The step that cuts `total` into as few parts of at most `most` as possible, of near-equal sizes."""
    parts = -(-total // max(1, most))
    return -(-total // parts)


def conv3x3_native(lib, x: torch.Tensor, u: torch.Tensor, bias: torch.Tensor | None, v: Variant,
                   pos_chunk: int | None = None) -> torch.Tensor:
    """conv3x3 with the native transforms, by chunks of tile rows: transformed tiles and products of a chunk
    together within SMALL_CHUNK_BYTES where that still leaves MIN_CHUNK_TILES tiles to a GEMM (few channels at
    many pixels: a VAE's, TAESD's; the chunk stays in cache between the passes), else each within CHUNK_BYTES;
    within a chunk the transformed tiles by rows of positions (all tiles each: the batched GEMM keeps its row
    count, and reads each position's weight once) within CHUNK_BYTES too, or `pos_chunk`. The buffers are
    allocated once per call."""
    n, c, h, w = x.shape
    k = u.shape[-1]
    a = v.a
    th, tw = tile_counts(h, w, v)
    xh = x.permute(0, 2, 3, 1)
    if xh.stride(3) != 1:
        xh = xh.contiguous()
    out = torch.empty(n, h, w, k, dtype=x.dtype)
    size = x.element_size()
    small = SMALL_CHUNK_BYTES // (a * a * n * tw * (c + k) * size)  # tile rows
    if small * n * tw < MIN_CHUNK_TILES:
        small = min(CHUNK_BYTES // (a * a * n * tw * k * size), CHUNK_BYTES // (a * n * tw * c * size))
    step = _balanced(th, small)
    most = n * min(step, th) * tw  # tiles in the largest chunk
    pos_step = pos_chunk or _balanced(a, CHUNK_BYTES // (a * most * c * size))
    prod_buf = torch.empty(a * a * most * k, dtype=x.dtype)
    t_buf = torch.empty(min(pos_step, a) * a * most * c, dtype=x.dtype)
    for r in range(0, th, step):
        rows = min(step, th - r)
        tiles = n * rows * tw
        prod = prod_buf[:a * a * tiles * k].view(a * a, tiles, k)
        for i in range(0, a, pos_step):
            ni = min(pos_step, a - i)
            t = t_buf[:ni * a * tiles * c].view(ni * a, tiles, c)
            cpu_winograd_native.input_transform(lib, xh, v, tw, r, rows, i, ni, t)
            torch.bmm(t, u[i * a:(i + ni) * a], out=prod[i * a:(i + ni) * a])
        cpu_winograd_native.output_transform(lib, prod, v, bias, out, tw, r, rows)
    return out.permute(0, 3, 1, 2)


def conv3x3_torch(x: torch.Tensor, u: torch.Tensor, bias: torch.Tensor | None, v: Variant) -> torch.Tensor:
    """conv3x3 in torch ops: the transforms as GEMMs by the kron matrices. Rows of tiles go through in chunks
    whose transformed tiles take <= CHUNK_BYTES (a VAE's 512x512 layers)."""
    n, c, h, w = x.shape
    k = u.shape[-1]
    m, a = v.m, v.a
    th, tw = tile_counts(h, w, v)
    xp = F.pad(x.permute(0, 2, 3, 1), (0, 0, 1, 1 + tw * m - w, 1, 1 + th * m - h))  # NHWC, zero border
    out = torch.empty(n, th, m, tw, m, k, dtype=x.dtype)
    step = max(1, CHUNK_BYTES // (a * a * n * tw * max(c, k) * x.element_size()))  # tile rows per chunk
    for r in range(0, th, step):
        rows = min(step, th - r)
        tiles = xp[:, r * m:(r + rows) * m + R - 1].unfold(1, a, m).unfold(2, a, m)  # (n, rows, tw, c, a, a)
        d = tiles.permute(4, 5, 0, 1, 2, 3).reshape(a * a, -1)  # (a*a, n*rows*tw*c): the one gather copy
        t = torch.mm(v.in_t, d).view(a * a, -1, c)  # (a*a, tiles, c)
        prod = torch.bmm(t, u)  # (a*a, tiles, k)
        y = torch.mm(v.out_t, prod.view(a * a, -1)).view(m, m, n, rows, tw, k).permute(2, 3, 0, 4, 1, 5)
        if bias is not None:
            torch.add(y, bias, out=out[:, r:r + rows])
        else:
            out[:, r:r + rows] = y
    out = out.view(n, th * m, tw * m, k)
    if th * m != h or tw * m != w:
        out = out[:, :h, :w].contiguous()
    return out.permute(0, 3, 1, 2)
