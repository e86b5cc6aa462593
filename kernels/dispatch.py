"""Kernel-side dispatch checks for the fastsd backends (issue #14 items 3 and 10): whether a Triton kernel covers
these inputs on this device, dtype and arch, and which of torch / triton `auto` should take.

- `supports(op, *tensors, **kw) -> str | None`: None when the kernel covers the call, else the reason. fp32 on a
  GPU never reaches a config that spills (attention at padded head dim > 128 in fp32: no config was found
  that compiles clean at every SD1.5 shape on all four archs, so it goes to SDPA); CUDA archs other than the report-checked sm_80/86/89/90 are not
  covered. Inputs that require grad are covered: the ops are registered with a backward.
- `shape_key(op, *tensors, **kw) -> str`: the key of the verdict file (kernels/verdicts.py).
- `auto_prefers_triton(op, *tensors, path=None, **kw) -> bool`: what backend `auto` does on a GPU: the kernel
  where it is supported and the verdict file does not say torch was faster at this shape.

Arguments per op (tensors positional, as the kernel functions take them; None for absent optional tensors):
  attention(q, k, v, causal=False)             group_norm(x, weight, bias, num_groups=)
  cfg_step(x, uncond, cond, old_denoised, noise)
"""
from __future__ import annotations


import torch

from fastsd.backends.triton import interpreter_enabled

from . import verdicts

OPS = ("attention", "group_norm", "cfg_step")
ARCHS = (80, 86, 89, 90)   # the archs kernels.report compiles and checks
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 256


def device_arch(device: torch.device) -> int | None:
    device = torch.device(device)
    if device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def _device_reason(device: torch.device) -> str | None:
    if device.type == "cuda":
        arch = device_arch(device)
        if arch not in ARCHS:
            return (f"sm_{arch} is not one of the archs the kernels' configs are checked for "
                    f"({', '.join(f'sm_{a}' for a in ARCHS)})")
        return None
    if device.type == "cpu" and interpreter_enabled():
        return None
    return f"triton kernels need a CUDA device or, on CPU, the interpreter (tensors are on {device.type})"


def _attention(q, k, v, causal=False, **_):
    if causal:
        return "causal attention is outside the kernel's contract"
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return "attention takes (B, H, L, D) tensors"
    D = q.shape[-1]
    if D > MAX_HEAD_DIM:
        return f"head dim {D} > {MAX_HEAD_DIM}"
    if k.shape != v.shape or k.shape[:2] != q.shape[:2] or k.shape[3] != D or min(q.shape[2], k.shape[2]) < 1:
        return "q, k, v shapes don't match"
    if q.device.type == "cuda":
        return gpu_attention_reason(D, q.dtype)
    return None


def gpu_attention_reason(head_dim: int, dtype: torch.dtype) -> str | None:
    """The GPU-only attention rule (also used by kernels.report to route those launches): fp32 at a padded head
    dim > 128 runs SDPA: no kernel config was found that compiles without spills at every SD1.5 shape on all
    four archs."""
    if dtype == torch.float32:
        from .attention import head_dim_chunks

        d0, d1 = head_dim_chunks(head_dim)
        if d0 + d1 > 128:
            return (f"fp32 attention at head dim {head_dim} (padded {d0 + d1}) has no kernel config free of spills "
                    "on every arch: SDPA")
    return None


def _group_norm(x, weight=None, bias=None, num_groups=None, **_):
    if x.dim() != 4:
        return "group_norm takes (N, C, H, W)"
    if num_groups is None or num_groups < 1 or x.shape[1] % num_groups:
        return f"C={x.shape[1]} is not divisible by num_groups={num_groups}"
    for t in (weight, bias):
        if t is not None and (t.dim() != 1 or t.numel() != x.shape[1]):
            return "weight / bias must be (C,)"
    return None


def _cfg_step(x, uncond, cond, old_denoised=None, noise=None, **_):
    for t in (x, uncond, old_denoised, noise):
        if t is not None and t.shape != cond.shape:
            return "cfg_step tensors must all have cond's shape"
    return None


_CHECKS = {"attention": _attention, "group_norm": _group_norm, "cfg_step": _cfg_step}


def supports(op: str, *tensors: torch.Tensor | None, **kw) -> str | None:
    """None when the Triton kernel for `op` covers these inputs on their device, dtype and arch; else why not."""
    if op not in _CHECKS:
        raise ValueError(f"unknown op {op!r}; one of {', '.join(OPS)}")
    present = [t for t in tensors if t is not None]
    if not present:
        return "no tensors"
    device = present[0].device
    if any(t.device != device for t in present):
        return "tensors on different devices"
    bad = [t.dtype for t in present if t.dtype not in DTYPES]
    if bad:
        return f"dtype {bad[0]} (kernels take float32, float16, bfloat16)"
    if op == "attention" and len({t.dtype for t in present}) > 1:
        return "q, k, v dtypes differ"
    why = _device_reason(device)
    if why:
        return why
    try:
        import triton  # noqa: F401
    except Exception as e:  # a broken install raising anything at import
        return f"triton does not import ({type(e).__name__}: {e})"
    return _CHECKS[op](*tensors, **kw)


def _dt(t: torch.Tensor) -> str:
    return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}.get(t.dtype, str(t.dtype))


def shape_key(op: str, *tensors: torch.Tensor | None, **kw) -> str:
    """Verdict-file key: dtype and the shape numbers the kernel's speed depends on."""
    if op == "attention":
        q, k = tensors[0], tensors[1]
        B, H, Lq, D = q.shape
        return f"{_dt(q)} B{B} H{H} Lq{Lq} Lk{k.shape[2]} D{D}"
    if op == "group_norm":
        x = tensors[0]
        N, C, Hh, W = x.shape
        return f"{_dt(x)} N{N} C{C} {Hh}x{W} G{kw.get('num_groups')}" + (" silu" if kw.get("silu") else "")
    if op == "cfg_step":
        x, uncond, cond = tensors[:3]
        return (f"{_dt(cond)} {'x'.join(map(str, cond.shape))}" + (" cfg" if uncond is not None else "")
                + (" old" if len(tensors) > 3 and tensors[3] is not None else "")
                + (" noise" if len(tensors) > 4 and tensors[4] is not None else ""))
    raise ValueError(f"unknown op {op!r}")


def auto_choice(reason: str | None, on_gpu: bool, op: str, key: str, path=None, arch: int | None = None) -> bool:
    """The decision of `auto_prefers_triton` from its parts (testable without a GPU): the kernel when it is on a
    GPU, supported (`reason` None) and the verdict file does not say torch won at `key`."""
    if not on_gpu or reason is not None:
        return False
    return verdicts.prefer_triton(op, key, path, arch=arch) is not False


def auto_prefers_triton(op: str, *tensors: torch.Tensor | None, path=None, **kw) -> bool:
    """Backend `auto` on a GPU: the kernel where `supports` says it covers the call and the verdict file has no
    "torch was faster" for this shape (no file / no verdict: the kernel). Never on a CPU (the interpreter is
    a correctness tool)."""
    present = [t for t in tensors if t is not None]
    if not present or present[0].device.type != "cuda":
        return False
    return auto_choice(supports(op, *tensors, **kw), True, op, shape_key(op, *tensors, **kw), path,
                       device_arch(present[0].device))
