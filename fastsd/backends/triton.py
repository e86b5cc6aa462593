"""The triton backend: the kernels of fastsd.kernels (registered ops `fastsd::attention`, `fastsd::group_norm`,
`fastsd::cfg_step`, with a backward) wherever `fastsd.kernels.dispatch.supports` says their contract covers the
call (device, arch, dtype, shapes), the reference ops elsewhere (CLIP's causal attention, the VAE's 512-wide head,
fp32 attention at a padded head dim > 128 on a GPU, float64).

Two op tables: `triton` takes the kernel wherever it is supported; `auto` on CUDA also follows the verdict file
written by the kernels benchmark suite on that GPU (kernels/verdicts.py): where torch was measured faster at a
shape, torch runs there.

Runs on CUDA tensors, or CPU tensors under the Triton interpreter (TRITON_INTERPRET=1 set before triton is
imported). Models keep their layout (prepare only hands them this op table).
"""
from __future__ import annotations

import os

import torch

from fastsd.backends import Backend, Ops, package_import_error, reference


def import_error() -> str | None:
    """None when triton imports, else the reason it doesn't."""
    return package_import_error("triton.language")


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


_DECISIONS: dict[tuple, bool] = {}  # the routing of each distinct call signature, decided once per process


def _takes_kernel(follow_verdicts: bool, op: str, *tensors, **kw) -> bool:
    """Whether this call runs the kernel. Decided once per (op, devices, dtypes, shapes, arguments): the checks
    (and the verdict file) are not re-read on every one of a UNet step's ~100 op calls."""
    key = (follow_verdicts, op, interpreter_enabled(), tuple(kw.items()),
           tuple(None if t is None else (t.device, t.dtype, t.shape) for t in tensors))
    take = _DECISIONS.get(key)
    if take is None:
        from fastsd.kernels import dispatch

        take = (dispatch.auto_prefers_triton(op, *tensors, **kw) if follow_verdicts
                else dispatch.supports(op, *tensors, **kw) is None)
        _DECISIONS[key] = take
    return take


def make_ops(follow_verdicts: bool) -> Ops:
    """The op table: the kernel where it is supported (and, with `follow_verdicts`, not measured slower)."""

    def attention(q, k, v, *, scale=None, causal=False):
        if not _takes_kernel(follow_verdicts, "attention", q, k, v, causal=causal):
            return reference.attention(q, k, v, scale=scale, causal=causal)
        from fastsd.kernels import attention as kernel

        return kernel.attention(q, k, v, scale=scale)

    def group_norm(x, num_groups, weight, bias, *, eps=1e-5, silu=False):
        if not _takes_kernel(follow_verdicts, "group_norm", x, weight, bias, num_groups=num_groups, silu=silu):
            return reference.group_norm(x, num_groups, weight, bias, eps=eps, silu=silu)
        from fastsd.kernels import group_norm as kernel

        return kernel.group_norm(x, num_groups, weight, bias, eps=eps, silu=silu)

    def cfg_step(x, uncond, cond, scale, coeffs, old_denoised=None, noise=None):
        if not _takes_kernel(follow_verdicts, "cfg_step", x, uncond, cond, old_denoised, noise):
            return reference.cfg_step(x, uncond, cond, scale, coeffs, old_denoised, noise)
        from fastsd.kernels import cfg_step as kernel

        return kernel.cfg_step(x, uncond, cond, scale, coeffs, old_denoised, noise)

    return Ops(attention=attention, group_norm=group_norm, feed_forward=reference.feed_forward, cfg_step=cfg_step)


class TritonBackend(Backend):
    name = "triton"


class AutoTritonBackend(TritonBackend):
    name = "auto:triton"


OPS = make_ops(follow_verdicts=False)
BACKEND = TritonBackend(OPS)
AUTO_BACKEND = AutoTritonBackend(make_ops(follow_verdicts=True))
