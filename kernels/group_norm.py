"""GroupNorm (+ optional fused SiLU), the Triton stand-in for `fastsd.ops.group_norm`.

Torch reference: `fastsd.ops.group_norm_reference` (statistics in fp32, as LDM's GroupNorm32).

x (N, C, H, W), contiguous or channels_last: both are handled through strides, never copied. The
spatial dims are flattened (stride_h == W * stride_w holds for both formats) so every kernel sees a
(channel, spatial) plane per image with strides (stride_c, stride_s); Triton specialises the stride
that equals 1, so loads are coalesced along spatial for NCHW and along channels for NHWC, with the
tile shape picked per format.

A group can be huge (VAE decoder at 512 px: 4 channels x 512 x 512 = 1M elements), so its statistics
are spread over many programs, in three launches:

1. `_gn_partial_stats_kernel`, grid (splits, channel blocks, N): each program reduces a
   (BLOCK_C channels) x (sp_per_prog spatial positions) chunk, tile by tile, into per-channel
   (mean, M2) partials (Chan's parallel Welford merge in fp32: no sum/sumsq cancellation).
2. `_gn_finalize_kernel`, grid (N * G,): merges the Cg x splits partials of a group (counts are
   implied by the split size) into mean and rstd = 1 / sqrt(var + eps) (biased variance, like torch).
3. `_gn_apply_kernel`, grid (spatial blocks, channel blocks, N): y = x * a + b with a = rstd * weight,
   b = bias - mean * a per channel, optional SiLU, cast back to x's dtype, stored with x's strides.

Scratch: 2 * N * C * splits + 2 * N * G fp32 values (splits <= 4096 / next_pow2(C / G)).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._utils import (cast_rtne, cdiv, check_dtype, check_runnable, interpreter_bf16_fix, launch, next_power_of_2,
                     round_up)

__all__ = ["group_norm", "group_norm_config", "GroupNormConfig"]


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
    for s0 in range(sp_start, sp_end, BLOCK_S):
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


def launch_plan(x, y, weight, bias, num_groups, eps, silu, *, sp_per_prog=None):
    """[(kernel, grid, args, constexprs, options), ...] for the three launches, plus the scratch buffers
    allocated on x's device. Shared by `group_norm` and `kernels.report` (meta tensors)."""
    N, C, H, W = x.shape
    HW = H * W
    G = num_groups
    xs, ys = _plane_strides(x), _plane_strides(y)
    assert xs is not None and ys is not None
    cl = _is_channels_last(x)
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
             dict(BLOCK_C=cfg.BLOCK_C, BLOCK_S=cfg.BLOCK_S), opts)
    fin = (_gn_finalize_kernel, (N * G,),
           (part_mean, part_m2, mean, rstd, C, HW, G, C // G, cfg.sp_per_prog, cfg.num_splits, float(eps)),
           dict(BLOCK_CG=cfg.BLOCK_CG, BLOCK_SPLIT=cfg.BLOCK_SPLIT),
           dict(num_warps=4 if cfg.BLOCK_CG * cfg.BLOCK_SPLIT <= 1024 else 8, num_stages=1))
    apply = (_gn_apply_kernel, (cdiv(HW, cfg.BLOCK_S), c_blocks, N),
             (x, y, x if weight is None else weight, x if bias is None else bias, mean, rstd,
              C, HW, G, C // G, *xs, *ys),
             dict(HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, SILU=bool(silu),
                  BLOCK_C=cfg.BLOCK_C, BLOCK_S=cfg.BLOCK_S, BF16_FIX=interpreter_bf16_fix(y.dtype, y.device)), opts)
    return [stats, fin, apply], cfg


def group_norm(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
               *, eps: float = 1e-5, silu: bool = False, _sp_per_prog: int | None = None) -> torch.Tensor:
    """GroupNorm over (C / num_groups channels x H x W) per image, affine, optional SiLU.
    x (N, C, H, W) in NCHW or channels_last; the output has x's dtype and memory format.
    `_sp_per_prog` (tests only) overrides how many spatial positions one stats program reduces."""
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
    if x.numel() == 0:
        return torch.empty_like(x)
    if _plane_strides(x) is None:  # neither NCHW- nor NHWC-like (an odd view): one copy, documented
        x = x.contiguous()
    weight = None if weight is None else weight.contiguous()
    bias = None if bias is None else bias.contiguous()
    y = torch.empty_like(x)  # preserve_format: same strides as a dense x
    if _plane_strides(y) is None:
        y = torch.empty_like(x, memory_format=torch.contiguous_format)
    launches, _ = launch_plan(x, y, weight, bias, num_groups, eps, silu, sp_per_prog=_sp_per_prog)
    for plan in launches:
        launch(plan, x.device)
    return y
