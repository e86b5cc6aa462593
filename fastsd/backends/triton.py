"""The triton backend: the kernels of fastsd.kernels (one per op) where their contract covers the call,
the reference ops elsewhere (CLIP's causal attention, the VAE's 512-wide head, autograd, other dtypes).

Runs on CUDA tensors, or CPU tensors under the Triton interpreter (TRITON_INTERPRET=1 set before triton
is imported). Models keep their layout (prepare only hands them this op table).
"""
from __future__ import annotations

import functools
import os

import torch

from fastsd.backends import Backend, Ops, reference

KERNEL_MAX_HEAD_DIM = 256  # the attention kernel keeps one (BLOCK_M, D) accumulator in registers
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@functools.cache
def import_error() -> str | None:
    """None when triton imports, else the reason it doesn't."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as e:  # ImportError, or a broken install raising anything at import
        return f"{type(e).__name__}: {e}"
    return None


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def unavailable(device: torch.device) -> str | None:
    """Why the kernels can't run on `device` (None when they can)."""
    err = import_error()
    if err is not None:
        return f"triton does not import ({err})"
    if device.type == "cuda" or device.type == "cpu" and interpreter_enabled():
        return None
    return (f"triton kernels need a CUDA device (tensors are on {device.type}); on CPU they run only "
            "under the Triton interpreter (set TRITON_INTERPRET=1 before starting Python)")


def _autograd(*tensors: torch.Tensor | None) -> bool:
    """The kernels have no backward: calls that autograd must follow take the reference ops."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def attention(q, k, v, *, scale=None, causal=False):
    if causal or q.shape[-1] > KERNEL_MAX_HEAD_DIM or _autograd(q, k, v):
        return reference.attention(q, k, v, scale=scale, causal=causal)
    from fastsd.kernels import attention as kernel

    return kernel.attention(q, k, v, scale=scale)


def group_norm(x, num_groups, weight, bias, *, eps=1e-5, silu=False):
    if x.dim() != 4 or _autograd(x, weight, bias):
        return reference.group_norm(x, num_groups, weight, bias, eps=eps, silu=silu)
    from fastsd.kernels import group_norm as kernel

    return kernel.group_norm(x, num_groups, weight, bias, eps=eps, silu=silu)


def cfg_step(x, uncond, cond, scale, coeffs, old_denoised=None, noise=None):
    """The fused kernel for fp32/fp16/bf16 tensors of one shape and device; anything else (e.g. the
    float64 sampler tests) takes the reference."""
    tensors = [t for t in (x, uncond, cond, old_denoised, noise) if t is not None]
    if not all(t.dtype in KERNEL_DTYPES and t.shape == cond.shape and t.device == cond.device for t in tensors) \
            or _autograd(*tensors):
        return reference.cfg_step(x, uncond, cond, scale, coeffs, old_denoised, noise)
    from fastsd.kernels import cfg_step as kernel

    return kernel.cfg_step(x, uncond, cond, scale, coeffs, old_denoised, noise)


class TritonBackend(Backend):
    name = "triton"


OPS = Ops(attention=attention, group_norm=group_norm, feed_forward=reference.feed_forward, cfg_step=cfg_step)
BACKEND = TritonBackend(OPS)
