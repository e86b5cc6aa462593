"""The one place that decides which implementation the ops in `fastsd.ops` run: "torch" | "triton" | "auto".

- "torch": the plain-PyTorch reference path.
- "triton": the Triton kernels in `kernels/`. Needs CUDA tensors, or CPU tensors with the Triton
  interpreter (TRITON_INTERPRET=1 set before triton is imported). An explicit request that can't be
  met raises BackendError with the reason.
- "auto" (default): triton when the tensor is on CUDA and triton imports, else torch, quietly. On a
  CPU, auto also takes the CPU-tuned torch paths: a Pipeline built under auto lays its models out in
  channels_last with prepacked oneDNN weights (`cpu_tuned`, fastsd/cpu_pack.py), and during inference
  (`cpu_tuned_ops`) bf16 attention is chunked over queries (fastsd/cpu_attention.py), bf16 GroupNorm
  skips the fp32 copies and the feed-forward runs in token chunks. "torch" never does: it stays the
  plain reference.

The setting is a context variable (not a module global): `use("triton")` scopes it, `set_backend`
sets it for the current context; the env var FASTSD_BACKEND gives the default.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import os

import torch

BACKENDS = ("torch", "triton", "auto")


class BackendError(RuntimeError):
    pass


def _check(name: str) -> str:
    if name not in BACKENDS:
        raise BackendError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return name


_current: contextvars.ContextVar[str | None] = contextvars.ContextVar("fastsd_backend", default=None)


def get_backend() -> str:
    """The requested backend name: the context's setting, else $FASTSD_BACKEND, else "auto"."""
    name = _current.get()
    if name is None:
        name = os.environ.get("FASTSD_BACKEND", "auto") or "auto"
    return _check(name)


def set_backend(name: str) -> None:
    _current.set(_check(name))


@contextlib.contextmanager
def use(name: str | None):
    """Run a block with backend `name` (None keeps the current one)."""
    if name is None:
        yield
        return
    token = _current.set(_check(name))
    try:
        yield
    finally:
        _current.reset(token)


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def triton_import_error() -> str | None:
    """None when triton imports, else the reason it doesn't."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as e:  # ImportError, or a broken install raising anything at import
        return f"{type(e).__name__}: {e}"
    return None


def triton_unavailable_reason(device: torch.device) -> str | None:
    """Why the triton kernels can't run on `device` right now (None when they can)."""
    err = triton_import_error()
    if err is not None:
        return f"triton does not import ({err})"
    if device.type == "cuda":
        return None
    if device.type == "cpu" and interpreter_enabled():
        return None
    return (f"triton kernels need a CUDA device (tensors are on {device.type}); on CPU they run only "
            "under the Triton interpreter (set TRITON_INTERPRET=1 before starting Python)")


def wants_triton(device: torch.device, *, supported: bool = True) -> bool:
    """Decide for one op call. `supported` says whether the kernel's contract covers these inputs.

    torch: never. auto: on CUDA with a working triton. triton: always, else BackendError naming why
    triton can't run here. Calls outside a kernel's contract (CLIP's causal attention, the VAE's
    single 512-wide head) take the torch path under every backend; README lists what each kernel covers.
    """
    name = get_backend()
    if name == "torch":
        return False
    reason = triton_unavailable_reason(device)
    if name == "auto":
        return supported and device.type == "cuda" and reason is None
    if reason is not None:
        raise BackendError(f"backend 'triton' was requested but {reason}")
    return supported


def cpu_tuned(device: torch.device, name: str | None = None) -> bool:
    """Whether to lay models out for the CPU-tuned paths (channels_last, prepacked convolutions):
    backend `name` (default: the current one) is auto and the device is a CPU."""
    return _check(name or get_backend()) == "auto" and device.type == "cpu"


def cpu_tuned_ops(device: torch.device) -> bool:
    """Whether an op call takes its CPU-tuned path: cpu_tuned, and autograd is off (those paths write
    into preallocated outputs, which autograd can't follow; training keeps the reference ops)."""
    return cpu_tuned(device) and not torch.is_grad_enabled()
