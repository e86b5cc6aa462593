"""GroupNorm (+ optional fused SiLU), the Triton stand-in for the torch reference
(`kernels._reference.group_norm`: statistics in fp32, as LDM's GroupNorm32), registered as `fastsd::group_norm`.

x (N, C, H, W), contiguous or channels_last: both are handled through strides, never copied. The spatial dims
are flattened (stride_h == W * stride_w holds for both formats) so every kernel sees a (channel, spatial) plane
per image with strides (stride_c, stride_s); Triton specialises the stride that equals 1, so loads are
coalesced along spatial for NCHW and along channels for NHWC, with the tile shape picked per format.

One launch when a group is small enough for one program to stream it twice (group elements
Cg * H * W <= FUSED_MAX_GROUP: every SD1.5 UNet norm at 512 and 768 px, the VAE decoder's 64x64 and 128x128
levels at 512 px): `_gn_fused_kernel`, grid (N * G,), reads the group once for the statistics (per-lane Welford
in fp32, merged with Chan's formula at the end: no sum/sumsq cancellation), then again (mostly from L2) to
write y = x * a + b (a = rstd * weight, b = bias - mean * a per channel), optional SiLU, cast to x's dtype.
No scratch memory.

Bigger groups (the VAE's 256x256 and 512x512 levels: up to 4 channels x 512 x 512 = 1M elements per group)
spread their statistics over many programs, in three launches:

1. `_gn_partial_stats_kernel`, grid (splits, channel blocks, N): each program reduces a
   (BLOCK_C channels) x (sp_per_prog spatial positions) chunk, tile by tile, into per-channel
   (mean, M2) partials (Chan's parallel Welford merge in fp32).
2. `_gn_finalize_kernel`, grid (N * G,): merges the Cg x splits partials of a group (counts are
   implied by the split size) into mean and rstd = 1 / sqrt(var + eps) (biased variance, like torch).
3. `_gn_apply_kernel`, grid (spatial blocks, channel blocks, N): the affine + SiLU pass.

Scratch (split path): 2 * N * C * splits + 2 * N * G fp32 values (splits <= 4096 / next_pow2(C / G)).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._utils import (cast_rtne, cdiv, check_dtype, check_runnable, interpreter_bf16_fix, launch, next_power_of_2,
                     round_up)

__all__ = ["group_norm", "group_norm_config", "GroupNormConfig", "group_norm_op", "fused_config", "launch_count"]


@triton.jit
def _gn_fused_kernel(
    X, Y, W, B,
    C, HW, G, CG, stride_xn, stride_xc, stride_xs, stride_yn, stride_yc, stride_ys, eps,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, EVEN_C: tl.constexpr, EVEN_S: tl.constexpr,
    BF16_FIX: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    """One program per (image, group): statistics pass, then the normalise pass, over the group's
    (Cg channels) x (HW positions) in (BLOCK_C, BLOCK_S) tiles."""
    pid = tl.program_id(0)  # n * G + g
    n = pid // G
    g = pid % G
    c_start = g * CG
    x_base = X + n.to(tl.int64) * stride_xn + c_start.to(tl.int64) * stride_xc
    y_base = Y + n.to(tl.int64) * stride_yn + c_start.to(tl.int64) * stride_yc
    rc = tl.arange(0, BLOCK_C)
    rs = tl.arange(0, BLOCK_S)

    # pass 1: per-lane Welford (count, mean, M2) in fp32
    cnt = tl.zeros([BLOCK_C, BLOCK_S], dtype=tl.float32)
    mean = tl.zeros([BLOCK_C, BLOCK_S], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_C, BLOCK_S], dtype=tl.float32)
    for c0 in range(0, CG, BLOCK_C):
        offs_c = c0 + rc
        for s0 in tl.range(0, HW, BLOCK_S, num_stages=NUM_STAGES):  # cp.async pipelining
            offs_s = s0 + rs
            ptrs = x_base + offs_c[:, None] * stride_xc + offs_s[None, :] * stride_xs
            if EVEN_C and EVEN_S:
                x = tl.load(ptrs).to(tl.float32)
                cnt += 1.0
                delta = x - mean
                mean += delta / cnt
                m2 += delta * (x - mean)
            else:
                valid = (offs_c < CG)[:, None] & (offs_s < HW)[None, :]
                x = tl.load(ptrs, mask=valid, other=0.0).to(tl.float32)
                cnt = tl.where(valid, cnt + 1.0, cnt)
                delta = x - mean
                mean = tl.where(valid, mean + delta / tl.maximum(cnt, 1.0), mean)
                m2 = tl.where(valid, m2 + delta * (x - mean), m2)
    total = tl.sum(tl.sum(cnt, 1), 0)
    g_mean = tl.sum(tl.sum(cnt * mean, 1), 0) / total
    d = mean - g_mean
    g_m2 = tl.sum(tl.sum(m2 + cnt * d * d, 1), 0)
    rstd = 1.0 / tl.sqrt(tl.maximum(g_m2 / total, 0.0) + eps)

    # pass 2: y = x * a + b per channel (+ SiLU)
    for c0 in range(0, CG, BLOCK_C):
        offs_c = c0 + rc
        mask_c = offs_c < CG
        a = tl.zeros([BLOCK_C], dtype=tl.float32) + rstd
        if HAS_WEIGHT:
            a = a * tl.load(W + c_start + offs_c, mask=mask_c, other=0.0).to(tl.float32)
        b = -g_mean * a
        if HAS_BIAS:
            b = b + tl.load(B + c_start + offs_c, mask=mask_c, other=0.0).to(tl.float32)
        for s0 in tl.range(0, HW, BLOCK_S, num_stages=NUM_STAGES):  # cp.async pipelining
            offs_s = s0 + rs
            ptrs = x_base + offs_c[:, None] * stride_xc + offs_s[None, :] * stride_xs
            out = y_base + offs_c[:, None] * stride_yc + offs_s[None, :] * stride_ys
            if EVEN_C and EVEN_S:
                x = tl.load(ptrs).to(tl.float32)
            else:
                valid = mask_c[:, None] & (offs_s < HW)[None, :]
                x = tl.load(ptrs, mask=valid, other=0.0).to(tl.float32)
            y = x * a[:, None] + b[:, None]
            if SILU:
                y = y * tl.sigmoid(y)
            y = cast_rtne(y, Y.dtype.element_ty, BF16_FIX)
            if EVEN_C and EVEN_S:
                tl.store(out, y)
            else:
                tl.store(out, y, mask=valid)


@triton.jit
def _gn_partial_stats_kernel(
    X, PART_MEAN, PART_M2,
    C, HW, stride_xn, stride_xc, stride_xs, sp_per_prog, num_splits,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    pid_s = tl.program_id(0)
    pid_c = tl.program_id(1)
    n = tl.program_id(2)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    x_base = X + n.to(tl.int64) * stride_xn
    sp_start = pid_s * sp_per_prog
    sp_end = tl.minimum(sp_start + sp_per_prog, HW)

    count = 0.0
    mean = tl.zeros([BLOCK_C], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    for s0 in tl.range(sp_start, sp_end, BLOCK_S, num_stages=2):  # cp.async double buffering
        offs_s = s0 + tl.arange(0, BLOCK_S)
        mask = mask_c[:, None] & (offs_s < sp_end)[None, :]
        x = tl.load(x_base + offs_c[:, None] * stride_xc + offs_s[None, :] * stride_xs,
                    mask=mask, other=0.0).to(tl.float32)
        n_t = tl.minimum(sp_end - s0, BLOCK_S).to(tl.float32)
        mean_t = tl.sum(x, 1) / n_t
        d = tl.where(mask, x - mean_t[:, None], 0.0)
        m2_t = tl.sum(d * d, 1)
        n_new = count + n_t
        delta = mean_t - mean
        mean = mean + delta * (n_t / n_new)
        m2 = m2 + m2_t + delta * delta * (count * n_t / n_new)
        count = n_new

    idx = (n * C + offs_c) * num_splits + pid_s
    tl.store(PART_MEAN + idx, mean, mask=mask_c)
    tl.store(PART_M2 + idx, m2, mask=mask_c)


@triton.jit
def _gn_finalize_kernel(
    PART_MEAN, PART_M2, MEAN, RSTD,
    C, HW, G, CG, sp_per_prog, num_splits, eps,
    BLOCK_CG: tl.constexpr, BLOCK_SPLIT: tl.constexpr,
):
    pid = tl.program_id(0)  # n * G + g
    n = pid // G
    g = pid % G
    offs_c = g * CG + tl.arange(0, BLOCK_CG)
    offs_p = tl.arange(0, BLOCK_SPLIT)
    mask = (tl.arange(0, BLOCK_CG) < CG)[:, None] & (offs_p < num_splits)[None, :]
    idx = (n * C + offs_c)[:, None] * num_splits + offs_p[None, :]
    mean_p = tl.load(PART_MEAN + idx, mask=mask, other=0.0)
    m2_p = tl.load(PART_M2 + idx, mask=mask, other=0.0)
    cnt_p = tl.minimum(sp_per_prog, HW - offs_p * sp_per_prog).to(tl.float32)
    cnt_p = tl.where(mask, cnt_p[None, :], 0.0)
    total = HW * CG * 1.0  # fp32 (HW, CG may be specialised to the constant 1)
    mean = tl.sum(tl.sum(cnt_p * mean_p, 1), 0) / total
    d = mean_p - mean
    m2 = tl.sum(tl.sum(m2_p + cnt_p * d * d, 1), 0)
    var = tl.maximum(m2 / total, 0.0)
    tl.store(MEAN + pid, mean)
    tl.store(RSTD + pid, 1.0 / tl.sqrt(var + eps))


@triton.jit
def _gn_apply_kernel(
    X, Y, W, B, MEAN, RSTD,
    C, HW, G, CG, stride_xn, stride_xc, stride_xs, stride_yn, stride_yc, stride_ys,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, BF16_FIX: tl.constexpr,
):
    pid_s = tl.program_id(0)
    pid_c = tl.program_id(1)
    n = tl.program_id(2)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    mask_c = offs_c < C
    mask = mask_c[:, None] & (offs_s < HW)[None, :]
    n64 = n.to(tl.int64)
    x = tl.load(X + n64 * stride_xn + offs_c[:, None] * stride_xc + offs_s[None, :] * stride_xs,
                mask=mask, other=0.0).to(tl.float32)
    grp = n * G + offs_c // CG
    mean = tl.load(MEAN + grp, mask=mask_c, other=0.0)
    rstd = tl.load(RSTD + grp, mask=mask_c, other=0.0)
    a = rstd
    if HAS_WEIGHT:
        a = a * tl.load(W + offs_c, mask=mask_c, other=0.0).to(tl.float32)
    b = -mean * a
    if HAS_BIAS:
        b = b + tl.load(B + offs_c, mask=mask_c, other=0.0).to(tl.float32)
    y = x * a[:, None] + b[:, None]
    if SILU:
        y = y * tl.sigmoid(y)
    tl.store(Y + n64 * stride_yn + offs_c[:, None] * stride_yc + offs_s[None, :] * stride_ys,
             cast_rtne(y, Y.dtype.element_ty, BF16_FIX), mask=mask)


@dataclass(frozen=True)
class GroupNormConfig:
    BLOCK_C: int       # channels per tile (stats and apply)
    BLOCK_S: int       # spatial positions per tile
    sp_per_prog: int   # spatial positions reduced by one stats program (multiple of BLOCK_S)
    num_splits: int    # stats programs per (image, channel block) = cdiv(HW, sp_per_prog)
    BLOCK_CG: int      # next_pow2(C / G), finalize tile rows
    BLOCK_SPLIT: int   # next_pow2(num_splits), finalize tile columns
    num_warps: int


TILE = 4096            # elements per tile: 16 fp32 values per thread at 8 warps
FINALIZE_TILE = 4096   # BLOCK_CG * BLOCK_SPLIT upper bound (the finalize program keeps them all in registers)
MIN_TILES_PER_PROG = 4  # a stats program reduces >= 4 tiles when the plane is big enough


def group_norm_config(N: int, C: int, HW: int, num_groups: int, channels_last: bool,
                      sp_per_prog: int | None = None) -> GroupNormConfig:
    """Tile shapes by memory format (TILE = 4096 elements, 8 warps):
      NCHW (spatial contiguous):  BLOCK_S = min(next_pow2(HW), 1024), BLOCK_C fills the tile;
      NHWC (channels contiguous): BLOCK_C = min(next_pow2(C), 128), BLOCK_S fills the tile.
    Stats: one program per MIN_TILES_PER_PROG tiles of a channel block's spatial plane, more when the
    split count would exceed the finalize tile (FINALIZE_TILE / next_pow2(C / G) splits). `sp_per_prog`
    overrides the split size (tests use it to spread a small group over many programs)."""
    cg = C // num_groups
    if channels_last:
        block_c = min(next_power_of_2(C), 128)
        block_s = min(max(TILE // block_c, 1), next_power_of_2(HW))
    else:
        block_s = min(next_power_of_2(HW), 1024)
        block_c = min(max(TILE // block_s, 1), next_power_of_2(C))
    block_cg = next_power_of_2(cg)
    max_splits = max(1, FINALIZE_TILE // block_cg)
    if sp_per_prog is None:
        sp_per_prog = MIN_TILES_PER_PROG * block_s
    sp_per_prog = max(int(sp_per_prog), 1)  # need not be a multiple of BLOCK_S (the loop masks at sp_end)
    if cdiv(HW, sp_per_prog) > max_splits:
        sp_per_prog = round_up(cdiv(HW, max_splits), block_s)
    num_splits = cdiv(HW, sp_per_prog)
    return GroupNormConfig(BLOCK_C=block_c, BLOCK_S=block_s, sp_per_prog=sp_per_prog, num_splits=num_splits,
                           BLOCK_CG=block_cg, BLOCK_SPLIT=next_power_of_2(num_splits), num_warps=8 if block_c * block_s >= 2048 else 4)


def _plane_strides(t: torch.Tensor) -> tuple[int, int, int] | None:
    """(stride_n, stride_c, stride_s) when H, W flatten into one strided spatial axis, else None."""
    sn, sc, sh, sw = t.stride()
    H, W = t.shape[2], t.shape[3]
    if H == 1:
        return sn, sc, sw
    if W == 1:
        return sn, sc, sh
    return (sn, sc, sw) if sh == W * sw else None


def _is_channels_last(t: torch.Tensor) -> bool:
    return t.stride(1) < t.stride(3) or (t.shape[3] == 1 and t.stride(1) < t.stride(2))


FUSED_MAX_GROUP = 320 * 1024  # group elements one program streams (twice): UNet <= 30 x 96 x 96 = 276,480 at 768 px
FUSED_TILE = 2048             # elements per tile: 8 per thread at 8 warps (one 16-byte fp16/bf16 load)


def _pow2_divisor(n: int) -> int:
    """Largest power of two dividing n."""
    return n & -n if n > 0 else 1


def _tile_len(n: int) -> int:
    """A tile length that divides n when a power of two >= 16 does (no masks), else next_pow2(n) (masked)."""
    d = _pow2_divisor(n)
    return d if d >= 16 else next_power_of_2(n)


@dataclass(frozen=True)
class FusedConfig:
    BLOCK_C: int
    BLOCK_S: int
    num_warps: int


def fused_config(C: int, HW: int, num_groups: int, channels_last: bool) -> FusedConfig | None:
    """Tile of the one-launch kernel, or None when the group is too big for one program (split path).
    Tiles divide the group exactly where they can (no masks): NCHW BLOCK_S = the largest power of two dividing
    HW (<= 2048; 9216 -> 1024), BLOCK_C = the largest power of two dividing Cg that keeps the tile <= 2048
    (masked next_pow2(Cg) rows, tile <= 1024, when that tile would be < 512 elements); NHWC channels first. Odd sizes fall
    back to masked next-power-of-two tiles. num_warps = tile / 256: 8 elements (16 bytes at fp16) per thread."""
    cg = C // num_groups
    if cg * HW > FUSED_MAX_GROUP:
        return None
    if channels_last:
        block_c = min(_tile_len(cg), FUSED_TILE)
        block_s = min(_tile_len(HW), max(1, FUSED_TILE // block_c))
    else:
        block_s = min(_tile_len(HW), FUSED_TILE)
        cap = max(1, FUSED_TILE // block_s)
        block_c = min(_pow2_divisor(cg), cap)
        if block_c * block_s < 512:  # tiny exact tiles (12x12 levels): masked channel rows instead, in tiles of
            block_c = min(next_power_of_2(cg), max(1, FUSED_TILE // 2 // block_s))  # <= 1024 (fp32: no spills)
    tile = block_c * block_s
    return FusedConfig(block_c, block_s, max(1, min(8, tile // 256)))


def launch_count(N: int, C: int, H: int, W: int, num_groups: int, channels_last: bool = False) -> int:
    """Kernel launches of one group_norm call: 1 (fused) or 3 (split statistics)."""
    return 1 if fused_config(C, H * W, num_groups, channels_last) is not None else 3


def launch_plan(x, y, weight, bias, num_groups, eps, silu, *, sp_per_prog=None):
    """[(kernel, grid, args, constexprs, options), ...]: one fused launch, or the three split launches with
    their scratch buffers allocated on x's device (`sp_per_prog` forces the split path). Shared by
    `group_norm` and `kernels.report` (meta tensors). Returns (launches, config)."""
    N, C, H, W = x.shape
    HW = H * W
    G = num_groups
    xs, ys = _plane_strides(x), _plane_strides(y)
    assert xs is not None and ys is not None
    cl = _is_channels_last(x)
    bf16_fix = interpreter_bf16_fix(y.dtype, y.device)
    affine = dict(HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, SILU=bool(silu))
    w_arg, b_arg = x if weight is None else weight, x if bias is None else bias
    fcfg = fused_config(C, HW, G, cl) if sp_per_prog is None else None
    if fcfg is not None:
        cg = C // G
        fused = (_gn_fused_kernel, (N * G,),
                 (x, y, w_arg, b_arg, C, HW, G, cg, *xs, *ys, float(eps)),
                 dict(**affine, BLOCK_C=fcfg.BLOCK_C, BLOCK_S=fcfg.BLOCK_S, EVEN_C=cg % fcfg.BLOCK_C == 0,
                      EVEN_S=HW % fcfg.BLOCK_S == 0, BF16_FIX=bf16_fix, NUM_STAGES=2),
                 dict(num_warps=fcfg.num_warps, num_stages=2))
        return [fused], fcfg
    cfg = group_norm_config(N, C, HW, G, cl, sp_per_prog)
    f32 = dict(dtype=torch.float32, device=x.device)
    part_mean = torch.empty(N * C * cfg.num_splits, **f32)
    part_m2 = torch.empty(N * C * cfg.num_splits, **f32)
    mean = torch.empty(N * G, **f32)
    rstd = torch.empty(N * G, **f32)
    c_blocks = cdiv(C, cfg.BLOCK_C)
    opts = dict(num_warps=cfg.num_warps, num_stages=1)
    stats = (_gn_partial_stats_kernel, (cfg.num_splits, c_blocks, N),
             (x, part_mean, part_m2, C, HW, *xs, cfg.sp_per_prog, cfg.num_splits),
             dict(BLOCK_C=cfg.BLOCK_C, BLOCK_S=cfg.BLOCK_S), dict(opts, num_stages=2))  # cp.async double buffer
    fin = (_gn_finalize_kernel, (N * G,),
           (part_mean, part_m2, mean, rstd, C, HW, G, C // G, cfg.sp_per_prog, cfg.num_splits, float(eps)),
           dict(BLOCK_CG=cfg.BLOCK_CG, BLOCK_SPLIT=cfg.BLOCK_SPLIT),
           dict(num_warps=4 if cfg.BLOCK_CG * cfg.BLOCK_SPLIT <= 1024 else 8, num_stages=1))
    apply = (_gn_apply_kernel, (cdiv(HW, cfg.BLOCK_S), c_blocks, N),
             (x, y, w_arg, b_arg, mean, rstd, C, HW, G, C // G, *xs, *ys),
             dict(**affine, BLOCK_C=cfg.BLOCK_C, BLOCK_S=cfg.BLOCK_S, BF16_FIX=bf16_fix), opts)
    return [stats, fin, apply], cfg


def _output_like(x: torch.Tensor) -> torch.Tensor:
    y = torch.empty_like(x)  # preserve_format: same strides as a dense x
    if _plane_strides(y) is None:
        y = torch.empty_like(x, memory_format=torch.contiguous_format)
    return y


def _forward(x, num_groups, weight, bias, eps, silu, sp_per_prog=None):
    if _plane_strides(x) is None:  # neither NCHW- nor NHWC-like (an odd view): one copy, documented
        x = x.contiguous()
    weight = None if weight is None else weight.contiguous()
    bias = None if bias is None else bias.contiguous()
    y = _output_like(x)
    if x.numel() == 0:
        return y
    launches, _ = launch_plan(x, y, weight, bias, num_groups, eps, silu, sp_per_prog=sp_per_prog)
    for plan in launches:
        launch(plan, x.device)
    return y


# ---------------------------------------------------------------------------------------------- registered op
@torch.library.custom_op("fastsd::group_norm", mutates_args=())
def group_norm_op(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
                  eps: float, silu: bool) -> torch.Tensor:
    """The kernel(s) as one torch op (torch.compile sees one opaque node; autograd: `_gn_backward`)."""
    return _forward(x, num_groups, weight, bias, eps, silu)


@group_norm_op.register_fake
def _gn_fake(x, num_groups, weight, bias, eps, silu):
    return _output_like(x if _plane_strides(x) is not None else x.contiguous())


def group_norm_backward_reference(x, num_groups, weight, bias, eps, silu, grad_out):
    """Gradients of the reference GroupNorm(+SiLU) (fp32 statistics), recomputed with torch ops.
    Returns dx, dweight, dbias (None where the input is None), in the inputs' dtypes."""
    N, C = x.shape[:2]
    G = num_groups
    xf = x.float().reshape(N, G, -1)
    mean = xf.mean(-1, keepdim=True)
    rstd = torch.rsqrt(xf.var(-1, unbiased=False, keepdim=True) + eps)
    xhat = ((xf - mean) * rstd).reshape(x.shape)
    bshape = (1, C) + (1,) * (x.dim() - 2)
    wf = weight.float().reshape(bshape) if weight is not None else None
    z = xhat * wf if wf is not None else xhat
    if bias is not None:
        z = z + bias.float().reshape(bshape)
    gz = grad_out.float()
    if silu:
        sig = torch.sigmoid(z)
        gz = gz * (sig * (1 + z * (1 - sig)))
    red = [0] + list(range(2, x.dim()))
    dw = (gz * xhat).sum(red).to(weight.dtype) if weight is not None else None
    db = gz.sum(red).to(bias.dtype) if bias is not None else None
    gxhat = (gz * wf if wf is not None else gz).reshape(N, G, -1)
    xh = xhat.reshape(N, G, -1)
    dx = rstd * (gxhat - gxhat.mean(-1, keepdim=True) - xh * (gxhat * xh).mean(-1, keepdim=True))
    return dx.reshape(x.shape).to(x.dtype), dw, db


def _gn_setup(ctx, inputs, output):
    x, num_groups, weight, bias, eps, silu = inputs
    ctx.save_for_backward(x, weight, bias)
    ctx.args = (num_groups, eps, silu)


def _gn_backward(ctx, grad_out):
    x, weight, bias = ctx.saved_tensors
    num_groups, eps, silu = ctx.args
    dx, dw, db = group_norm_backward_reference(x, num_groups, weight, bias, eps, silu, grad_out)
    return dx, None, dw, db, None, None


group_norm_op.register_autograd(_gn_backward, setup_context=_gn_setup)


def group_norm(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
               *, eps: float = 1e-5, silu: bool = False, _sp_per_prog: int | None = None) -> torch.Tensor:
    """GroupNorm over (C / num_groups channels x H x W) per image, affine, optional SiLU.
    x (N, C, H, W) in NCHW or channels_last; the output has x's dtype and memory format. Differentiable
    (through `fastsd::group_norm`'s registered backward). `_sp_per_prog` (tests only) forces the split path
    with that many spatial positions per stats program (not through the registered op)."""
    check_dtype("x", x)
    if x.dim() != 4:
        raise ValueError(f"x must be (N, C, H, W), got shape {tuple(x.shape)}")
    N, C, H, W = x.shape
    if num_groups < 1 or C % num_groups:
        raise ValueError(f"C={C} is not divisible by num_groups={num_groups}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and (t.dim() != 1 or t.numel() != C):
            raise ValueError(f"{name} must have shape ({C},), got {tuple(t.shape)}")
    check_runnable("group_norm", x.device)
    if _sp_per_prog is not None:
        return _forward(x, num_groups, weight, bias, eps, silu, _sp_per_prog)
    return group_norm_op(x, num_groups, weight, bias, float(eps), bool(silu))
