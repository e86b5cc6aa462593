"""The Triton kernels in kernels/, each with its torch reference, the SD1.5 shapes it runs at, and the
FLOPs / bytes one call moves (for TFLOP/s and GB/s = work / measured time).

Kernels are discovered at run time (`discover()`): each kernels/<op>.py module with a case here is
benchmarked; a kernel module without a case is reported as such.
Shapes come from kernels/shapes.py (the one source of SD1.5 launch shapes, derived from fastsd.config.SD15);
each Shape carries the verdict-file key (kernels/dispatch.py `shape_key`) under which a GPU run records which
of torch / triton was faster (kernels/verdicts.py).

FLOP / byte models (minimum traffic: every input read once, the output written once):
  attention   4 * B*H*Lq*Lk*D FLOPs (QK^T and PV); bytes (B*H*(2*Lq*D + 2*Lk*D)) * itemsize
  group_norm  ~8 FLOPs/element (+4 with SiLU), bytes 2 * N*C*HW * itemsize (+ weight, bias)
  cfg_step    uncond + s*(cond - uncond), then a*x + b*den + c*old + d*noise: ~10 FLOPs/element,
              bytes (inputs read + output written) * itemsize
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Any, Callable

import torch


DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@dataclass
class Shape:
    label: str
    args: tuple          # passed to the case's make()
    flops: float
    bytes_: float
    key: str = ""        # kernels.dispatch.shape_key of the call (verdict file)


@dataclass
class Case:
    op: str
    module: str                                         # kernels.<op>
    shapes: Callable[[int, bool, torch.dtype], list[Shape]]
    make: Callable[..., tuple[Callable[[], Any], Callable[[], Any]]]  # (ref_fn, triton_fn) for one shape


def kernel_modules() -> list[str]:
    """The ops with a module in kernels/ right now (kernels/<op>.py, not helpers)."""
    import fastsd.kernels

    d = os.path.dirname(os.path.abspath(fastsd.kernels.__file__))
    out = []
    for f in sorted(os.listdir(d)):
        if f.endswith(".py") and not f.startswith("_"):
            with open(os.path.join(d, f)) as fh:
                if "@triton.jit" in fh.read():  # a kernel module, not a tool (report.py, traffic.py)
                    out.append(f[:-3])
    return out


# ------------------------------------------------------------------------------------------ attention

def attention_shapes(res: int, quick: bool, dtype: torch.dtype) -> list[Shape]:
    from fastsd.kernels.shapes import unet_attention_calls

    calls = unet_attention_calls(res, 1)
    if quick:  # top level self + cross, the middle block's cross
        calls = [calls[0], calls[1], calls[-1]]
    el = torch.tensor([], dtype=dtype).element_size()
    dn = DTYPE_NAMES[dtype]
    out = []
    for c in calls:
        b, h, lq, lk, d = c.B, c.H, c.Lq, c.Lk, c.D
        out.append(Shape(f"{res}px {c.label}", (b, h, lq, lk, d), 4.0 * b * h * lq * lk * d,
                         el * b * h * (2 * lq * d + 2 * lk * d), f"{dn} B{b} H{h} Lq{lq} Lk{lk} D{d}"))
    return out


def attention_make(args, dtype, device, seed=0):
    from fastsd.backends.reference import attention as attention_reference

    b, h, lq, lk, d = args
    g = torch.Generator(device="cpu").manual_seed(seed)
    # the UNet's layout: to_q(x).view(B, L, H, D).transpose(1, 2)
    q = torch.randn(b, lq, h, d, generator=g).to(device, dtype).transpose(1, 2)
    k = torch.randn(b, lk, h, d, generator=g).to(device, dtype).transpose(1, 2)
    v = torch.randn(b, lk, h, d, generator=g).to(device, dtype).transpose(1, 2)

    def triton_fn():
        return importlib.import_module("fastsd.kernels.attention").attention(q, k, v)

    return (lambda: attention_reference(q, k, v)), triton_fn


# ------------------------------------------------------------------------------------------ group norm

def group_norm_shapes(res: int, quick: bool, dtype: torch.dtype) -> list[Shape]:
    from fastsd.kernels.shapes import unet_group_norm_calls, vae_decoder_group_norm_calls

    calls = list(dict.fromkeys(unet_group_norm_calls(res, 1) + vae_decoder_group_norm_calls(res, 1)))
    if quick:  # a UNet resblock norm, a transformer norm, a VAE decoder norm
        calls = [calls[0], next(c for c in calls if c.where == "unet transformer"), calls[-1]]
    el = torch.tensor([], dtype=dtype).element_size()
    dn = DTYPE_NAMES[dtype]
    out = []
    for c in calls:
        numel = c.N * c.C * c.H * c.W
        key = f"{dn} N{c.N} C{c.C} {c.H}x{c.W} G{c.groups}" + (" silu" if c.silu else "")
        out.append(Shape(f"{res}px {c.label}", (c.N, c.C, c.H, c.eps, c.silu), (12.0 if c.silu else 8.0) * numel,
                         el * (2 * numel + 2 * c.C), key))
    return out


GROUPS = 32


def group_norm_make(args, dtype, device, seed=0):
    from fastsd.backends.reference import group_norm as group_norm_reference

    n, c, side, eps, silu = args
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(n, c, side, side, generator=g).to(device, dtype)
    w = (1 + 0.1 * torch.randn(c, generator=g)).to(device, dtype)
    bias = (0.1 * torch.randn(c, generator=g)).to(device, dtype)

    def triton_fn():
        return importlib.import_module("fastsd.kernels.group_norm").group_norm(x, GROUPS, w, bias, eps=eps, silu=silu)

    return (lambda: group_norm_reference(x, GROUPS, w, bias, eps=eps, silu=silu)), triton_fn


# ------------------------------------------------------------------------------------------ cfg step

def cfg_step_shapes(res: int, quick: bool, dtype: torch.dtype) -> list[Shape]:
    from fastsd.kernels.shapes import latent_shape

    el = torch.tensor([], dtype=dtype).element_size()
    out = []
    for batch in ((1,) if quick else (1, 4)):
        shape = latent_shape(res, batch)
        numel = shape[0] * shape[1] * shape[2] * shape[3]
        # reads x, uncond, cond, old denoised, noise; writes x_next (and denoised)
        out.append(Shape(f"{res}px latents B{batch} {'x'.join(map(str, shape[1:]))}", (batch, shape[2]),
                         10.0 * numel, el * 7 * numel, f"{DTYPE_NAMES[dtype]} {'x'.join(map(str, shape))} cfg old noise"))
    return out


def cfg_step_make(args, dtype, device, seed=0):
    """cfg_step(x, uncond, cond, scale, coeffs, old_denoised, noise) -> (x_next, denoised), with every term
    present (dpmpp_2m-like old_denoised and ancestral noise at once: the most traffic)."""
    batch, lat = args
    g = torch.Generator(device="cpu").manual_seed(seed)
    x, uncond, cond, old, noise = [torch.randn(batch, 4, lat, lat, generator=g).to(device, dtype) for _ in range(5)]
    scale, coeffs = 7.5, (0.9, 0.1, -0.05, 0.3)
    from fastsd.backends.reference import cfg_step as ref

    def triton_fn():
        return importlib.import_module("fastsd.kernels.cfg_step").cfg_step(x, uncond, cond, scale, coeffs, old, noise)[0]

    return (lambda: ref(x, uncond, cond, scale, coeffs, old, noise)[0]), triton_fn


CASES = {
    "attention": Case("attention", "fastsd.kernels.attention", attention_shapes, attention_make),
    "group_norm": Case("group_norm", "fastsd.kernels.group_norm", group_norm_shapes, group_norm_make),
    "cfg_step": Case("cfg_step", "fastsd.kernels.cfg_step", cfg_step_shapes, cfg_step_make),
}


def discover() -> dict[str, str | None]:
    """op -> None when benchmarkable, else why not (a kernel module without a case here)."""
    return {op: None if op in CASES else "no benchmark case in benchmarks/kernel_cases.py"
            for op in kernel_modules()}
