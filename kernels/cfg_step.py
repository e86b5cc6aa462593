"""Fused classifier-free guidance + sampler update, the Triton stand-in for the torch reference
(`kernels._reference.cfg_step`), registered as `fastsd::cfg_step`.

Every sampler step in `fastsd.samplers` is one linear combination with host-computed coefficients
(a, b, c, d), and with CFG the denoised prediction is the guided mix of the two halves of the
batched denoiser output:

    denoised = uncond + scale * (cond - uncond)            (cond alone when there is no uncond)
    x_next   = a * x + b * denoised + c * old_denoised + d * noise

One pass over the elements: read x, uncond, cond, old_denoised (dpmpp_2m) and noise (ancestral
samplers), write x_next and, with guidance, denoised (the next step's old_denoised, and what
callbacks see). Without guidance denoised IS cond and is not written again. Math in fp32, any of
fp32/fp16/bf16 per tensor; x_next has x's dtype, denoised the promoted dtype of x, uncond and cond
(fp32 latents + bf16 model output -> fp32 denoised). Absent terms are constexpr flags (HAS_X for
a == 0, HAS_OLD for c == 0, HAS_NOISE for d == 0, HAS_UNCOND for no guidance): their loads and
FMAs are not in the binary.

All tensors are the same shape and viewed flat: contiguous ones are used in place (the two halves
`out.chunk(2)` of a contiguous (2B, ...) model output are contiguous views, so no copy); any other
layout is copied once with `.contiguous()`. Flat 1-D grid of BLOCK-element programs, every load
masked against the element count.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._utils import cast_rtne, cdiv, check_dtype, check_runnable, interpreter_bf16_fix, launch, next_power_of_2

__all__ = ["cfg_step", "cfg_step_config", "CFGStepConfig", "cfg_step_op"]


@triton.jit
def _cfg_step_kernel(
    X, UNCOND, COND, OLD, NOISE, X_OUT, D_OUT,
    N, scale, coef_a, coef_b, coef_c, coef_d,
    HAS_X: tl.constexpr, HAS_UNCOND: tl.constexpr, HAS_OLD: tl.constexpr, HAS_NOISE: tl.constexpr,
    BLOCK: tl.constexpr, BF16_FIX_X: tl.constexpr, BF16_FIX_D: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N

    den = tl.load(COND + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_UNCOND:
        unc = tl.load(UNCOND + offs, mask=mask, other=0.0).to(tl.float32)
        den = unc + (den - unc) * scale
        tl.store(D_OUT + offs, cast_rtne(den, D_OUT.dtype.element_ty, BF16_FIX_D), mask=mask)
    out = den * coef_b
    if HAS_X:
        out += tl.load(X + offs, mask=mask, other=0.0).to(tl.float32) * coef_a
    if HAS_OLD:
        out += tl.load(OLD + offs, mask=mask, other=0.0).to(tl.float32) * coef_c
    if HAS_NOISE:
        out += tl.load(NOISE + offs, mask=mask, other=0.0).to(tl.float32) * coef_d
    tl.store(X_OUT + offs, cast_rtne(out, X_OUT.dtype.element_ty, BF16_FIX_X), mask=mask)


@dataclass(frozen=True)
class CFGStepConfig:
    BLOCK: int
    num_warps: int


MIN_PROGRAMS = 264   # 2 programs per SM on a 132-SM H100 (108 SMs on A100): fill the machine first
MIN_BLOCK = 256
MAX_BLOCK = 2048


def cfg_step_config(n: int) -> CFGStepConfig:
    """Elementwise and memory-bound: BLOCK = next_pow2(n / MIN_PROGRAMS) clamped to [256, 2048], so a
    small tensor still spreads over >= ~2 programs per SM, and num_warps = BLOCK / 128 (at most 8):
    4 consecutive elements per thread (one 128-bit load per fp32 stream), 8 at BLOCK 2048.
    SD1.5 latents: 512 px B1 (16384 elements) -> 256 x 64 programs; 768 px B2 (73728) -> 512 x 144."""
    block = min(MAX_BLOCK, max(MIN_BLOCK, next_power_of_2(cdiv(max(n, 1), MIN_PROGRAMS))))
    return CFGStepConfig(BLOCK=block, num_warps=min(8, block // 128))


def result_dtypes(x: torch.Tensor, uncond: torch.Tensor | None, cond: torch.Tensor) -> tuple[torch.dtype, torch.dtype]:
    """(x_next dtype, denoised dtype): x's, and x/uncond/cond promoted (cond's own dtype without guidance)."""
    if uncond is None:
        return x.dtype, cond.dtype
    return x.dtype, torch.promote_types(x.dtype, torch.promote_types(uncond.dtype, cond.dtype))


def launch_plan(x, uncond, cond, old, noise, x_out, d_out, scale, coeffs):
    """(kernel, grid, positional args, constexprs, options). Absent tensors are passed as `cond` (never
    read: their flag is off). Shared by `cfg_step` and `kernels.report` (meta tensors)."""
    a, b, c, d = (float(v) for v in coeffs)
    n = cond.numel()
    cfg = cfg_step_config(n)
    has_x, has_unc, has_old, has_noise = a != 0, uncond is not None, c != 0, d != 0
    absent = lambda t, present: t if present else cond
    args = (absent(x, has_x), absent(uncond, has_unc), cond, absent(old, has_old), absent(noise, has_noise),
            x_out, d_out if has_unc else x_out, n, float(scale) if has_unc else 1.0, a, b, c, d)
    constexprs = dict(HAS_X=has_x, HAS_UNCOND=has_unc, HAS_OLD=has_old, HAS_NOISE=has_noise, BLOCK=cfg.BLOCK,
                      BF16_FIX_X=interpreter_bf16_fix(x_out.dtype, x_out.device),
                      BF16_FIX_D=has_unc and interpreter_bf16_fix(d_out.dtype, d_out.device))
    return _cfg_step_kernel, (cdiv(n, cfg.BLOCK),), args, constexprs, dict(num_warps=cfg.num_warps, num_stages=1)


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t if t.is_contiguous() else t.contiguous()


def _forward(x, uncond, cond, scale, coeffs, old_denoised, noise):
    x_dt, d_dt = result_dtypes(x, uncond, cond)
    x_out = torch.empty(x.shape, dtype=x_dt, device=x.device)
    d_out = torch.empty(x.shape if uncond is not None else (0,), dtype=d_dt, device=x.device)
    if x.numel() == 0:
        return x_out, d_out
    x, cond = _flat(x), _flat(cond)
    uncond, old_denoised, noise = (None if t is None else _flat(t) for t in (uncond, old_denoised, noise))
    launch(launch_plan(x, uncond, cond, old_denoised, noise, x_out, d_out, scale, coeffs), x.device)
    return x_out, d_out


# ---------------------------------------------------------------------------------------------- registered op
@torch.library.custom_op("fastsd::cfg_step", mutates_args=())
def cfg_step_op(x: torch.Tensor, uncond: torch.Tensor | None, cond: torch.Tensor, scale: float | None,
                coeffs: list[float], old_denoised: torch.Tensor | None,
                noise: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_next, denoised); without guidance denoised is `cond` itself, which an op may not return (outputs
    never alias inputs): the op then returns an empty second output and `cfg_step` hands back `cond`."""
    return _forward(x, uncond, cond, scale, coeffs, old_denoised, noise)


@cfg_step_op.register_fake
def _cfg_step_fake(x, uncond, cond, scale, coeffs, old_denoised, noise):
    x_dt, d_dt = result_dtypes(x, uncond, cond)
    return (torch.empty(x.shape, dtype=x_dt, device=x.device),
            torch.empty(x.shape if uncond is not None else (0,), dtype=d_dt, device=x.device))


def _cfg_setup(ctx, inputs, output):
    x, uncond, cond, scale, coeffs, old, noise = inputs
    ctx.meta = [(t.dtype if t is not None else None) for t in (x, uncond, cond, old, noise)]
    ctx.scale, ctx.coeffs = scale, tuple(coeffs)


def _cfg_backward(ctx, g_x, g_den):
    """The update is linear: x_next = a x + b den + c old + d noise, den = (1 - s) uncond + s cond."""
    a, b, c, d = ctx.coeffs
    x_dt, unc_dt, cond_dt, old_dt, noise_dt = ctx.meta
    gx = g_x.float()
    g_total = gx * b
    if unc_dt is not None and g_den is not None and g_den.numel():
        g_total = g_total + g_den.float()
    cast = lambda t, dt: None if dt is None else t.to(dt)
    s = ctx.scale if unc_dt is not None else 1.0
    return (cast(gx * a, x_dt), cast(g_total * (1 - s), unc_dt), cast(g_total * s, cond_dt), None, None,
            cast(gx * c, old_dt), cast(gx * d, noise_dt))


cfg_step_op.register_autograd(_cfg_backward, setup_context=_cfg_setup)


def cfg_step(x: torch.Tensor, uncond: torch.Tensor | None, cond: torch.Tensor, scale: float | None,
             coeffs: tuple[float, float, float, float], old_denoised: torch.Tensor | None = None,
             noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_next, denoised); see the module docstring and the reference's contract. Differentiable (through
    `fastsd::cfg_step`'s registered backward)."""
    a, b, c, d = coeffs
    if c != 0 and old_denoised is None:
        raise ValueError("coeffs c != 0 needs old_denoised")
    if d != 0 and noise is None:
        raise ValueError("coeffs d != 0 needs noise")
    if uncond is not None and scale is None:
        raise ValueError("guidance (an uncond) needs a scale")
    named = (("x", x), ("uncond", uncond), ("cond", cond), ("old_denoised", old_denoised), ("noise", noise))
    for name, t in named:
        if t is None:
            continue
        check_dtype(name, t)
        if t.shape != x.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, x has {tuple(x.shape)}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device}, x on {x.device}")
    check_runnable("cfg_step", x.device)
    x_next, den = cfg_step_op(x, uncond, cond, None if scale is None else float(scale),
                              [float(v) for v in coeffs], old_denoised if c != 0 else None, noise if d != 0 else None)
    return x_next, (den if uncond is not None else cond)
