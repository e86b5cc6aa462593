"""The ops the models (attention, group_norm) and the samplers (cfg_step) call where a Triton kernel can stand
in: each has its torch reference here and dispatches through `fastsd.backend` to the kernel in `kernels/`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fastsd import backend, cpu_tune, cpuinfo

KERNEL_MAX_HEAD_DIM = 256  # kernels.attention keeps one (BLOCK_M, D) accumulator in registers


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None,
                        causal: bool = False) -> torch.Tensor:
    """q (B, H, Lq, D), k/v (B, H, Lk, D) -> (B, H, Lq, D); softmax(q k^T * scale) v."""
    return F.scaled_dot_product_attention(q, k, v, scale=scale, is_causal=causal)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None,
              causal: bool = False) -> torch.Tensor:
    """Multi-head attention. The Triton kernel is non-causal with head dim <= 256; CLIP's causal
    attention and the VAE's single 512-wide head take the torch paths. On a CPU under auto, bf16
    takes the chunked attention of fastsd/cpu_attention.py (faster than SDPA there, as accurate)."""
    supported = not causal and q.shape[-1] <= KERNEL_MAX_HEAD_DIM
    if backend.wants_triton(q.device, supported=supported):
        from fastsd.kernels import attention as kernel

        return kernel.attention(q, k, v, scale=scale)
    if not causal and q.dtype == torch.bfloat16 and backend.cpu_tuned_ops(q.device) and cpuinfo.native_bf16():
        from fastsd.cpu_attention import attention_chunked

        key = (f"attention bf16 q{tuple(q.shape)} k{tuple(k.shape)} t{torch.get_num_threads()}")
        candidates = {"chunked": lambda: attention_chunked(q, k, v, scale=scale),
                      "sdpa": lambda: attention_reference(q, k, v, scale=scale)}
        return candidates[cpu_tune.tuner().choose(key, candidates, default="chunked")]()
    return attention_reference(q, k, v, scale=scale, causal=causal)


def group_norm_reference(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
                         *, eps: float = 1e-5, silu: bool = False) -> torch.Tensor:
    """GroupNorm with statistics in fp32 (as LDM's GroupNorm32), optionally followed by SiLU; x (N, C, *)."""
    y = F.group_norm(x.float(), num_groups, None if weight is None else weight.float(),
                     None if bias is None else bias.float(), eps)
    if silu:
        y = F.silu(y)
    return y.to(x.dtype)


def group_norm(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
               *, eps: float = 1e-5, silu: bool = False) -> torch.Tensor:
    if backend.wants_triton(x.device, supported=x.dim() == 4):
        from fastsd.kernels import group_norm as kernel

        return kernel.group_norm(x, num_groups, weight, bias, eps=eps, silu=silu)
    if x.dtype == torch.bfloat16 and backend.cpu_tuned_ops(x.device):
        # PyTorch's CPU kernel keeps bf16 statistics in fp32 itself; skipping the reference's fp32 copies
        # of the activation lowers the VAE's peak memory (its 128-channel 512x512 activations)
        y = F.group_norm(x, num_groups, weight, bias, eps)
        return F.silu(y, inplace=True) if silu else y
    return group_norm_reference(x, num_groups, weight, bias, eps=eps, silu=silu)


# ---------------------------------------------------------------------------------------------- CFG + sampler step
#
#   cfg_step(x, uncond, cond, scale, coeffs, old_denoised=None, noise=None) -> (x_next, denoised)
#
#   denoised = uncond + (cond - uncond) * scale     (guidance; with uncond=None, denoised is cond itself)
#   x_next   = a * x + b * denoised + c * old_denoised + d * noise,   coeffs = (a, b, c, d) host floats
#
# x, uncond, cond, old_denoised, noise: same shape (uncond/cond are the halves of the batched denoiser
# output, e.g. `out.chunk(2)`). Terms with a zero coefficient are skipped (old_denoised / noise may then
# be None). x_next has x's dtype; denoised the promoted dtype of x, uncond and cond (cond as given when
# there is no guidance). The kernel (kernels/cfg_step.py) does it in one pass with fp32 math; the
# reference below is the ONE torch implementation (the samplers' unfused update goes through it too).

def cfg_guidance_reference(uncond: torch.Tensor, cond: torch.Tensor, scale: float) -> torch.Tensor:
    """uncond + (cond - uncond) * scale, in the promoted dtype of the two."""
    dt = torch.promote_types(uncond.dtype, cond.dtype)
    uncond, cond = uncond.to(dt), cond.to(dt)
    return uncond + (cond - uncond) * scale


def cfg_step_reference(x: torch.Tensor, uncond: torch.Tensor | None, cond: torch.Tensor, scale: float | None,
                       coeffs: tuple[float, float, float, float], old_denoised: torch.Tensor | None = None,
                       noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    a, b, c, d = coeffs
    if uncond is None:
        denoised = cond
    else:
        if scale is None:
            raise ValueError("guidance (an uncond) needs a scale")
        dt = torch.promote_types(x.dtype, torch.promote_types(uncond.dtype, cond.dtype))
        denoised = cfg_guidance_reference(uncond.to(dt), cond.to(dt), scale)
    out = denoised * b if a == 0 else torch.add(denoised * b, x, alpha=a)
    if c != 0:
        if old_denoised is None:
            raise ValueError("coeffs c != 0 needs old_denoised")
        out = out.add_(old_denoised, alpha=c)
    if d != 0:
        if noise is None:
            raise ValueError("coeffs d != 0 needs noise")
        out = out.add_(noise, alpha=d)
    return out.to(x.dtype), denoised


_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def cfg_step(x: torch.Tensor, uncond: torch.Tensor | None, cond: torch.Tensor, scale: float | None,
             coeffs: tuple[float, float, float, float], old_denoised: torch.Tensor | None = None,
             noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Guidance + sampler update (contract above). The kernel covers fp32/fp16/bf16 tensors of one shape;
    anything else (e.g. the float64 sampler tests) takes the reference path under every backend."""
    tensors = [t for t in (x, uncond, cond, old_denoised, noise) if t is not None]
    supported = all(t.dtype in _KERNEL_DTYPES and t.shape == cond.shape and t.device == cond.device for t in tensors)
    if backend.wants_triton(cond.device, supported=supported):
        from fastsd.kernels import cfg_step as kernel

        return kernel.cfg_step(x, uncond, cond, scale, coeffs, old_denoised, noise)
    return cfg_step_reference(x, uncond, cond, scale, coeffs, old_denoised, noise)
