"""Backends: the implementations of the swappable ops, one module each, chosen once per pipeline.

  torch   reference.py  plain PyTorch (SDPA, fp32-statistics GroupNorm, the torch sampler update):
                        the path every other backend is tested against
  cpu     cpu.py        PyTorch tuned for oneDNN on a CPU: channels_last, prepacked weights, chunked bf16
                        attention and feed-forward, each piece where it is measured faster on this CPU
  triton  triton.py     the Triton kernels of fastsd.kernels (CUDA, or a CPU under the interpreter)
  openvino openvino.py  the UNet, VAE and text encoder as compiled OpenVINO models (CPU; optional extra)
  auto                  on CUDA triton where supported and not measured slower (kernels/verdicts.py); on a CPU openvino where it was measured faster here
                        (python -m fastsd.backends.openvino_auto), else cpu

A `Backend` is an op table (`Ops`) plus `prepare(model)` / `unprepare(model)`: prepare puts the table on
every module that calls ops and lays the model out for the backend; unprepare gives the plain model back.
This package imports no backend module until `get` asks for it.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

NAMES = ("auto", "torch", "cpu", "triton", "openvino")


class BackendError(RuntimeError):
    pass


@dataclass(frozen=True)
class Ops:
    """The ops a backend swaps. Signatures (the reference implementations in reference.py define them):
    attention(q, k, v, *, scale=None, causal=False); group_norm(x, num_groups, weight, bias, *, eps, silu);
    feed_forward(block, x) -> x + block.ff.net(block.norm3(x)); cfg_step(x, uncond, cond, scale, coeffs,
    old_denoised=None, noise=None) -> (x_next, denoised)."""

    attention: Callable[..., torch.Tensor]
    group_norm: Callable[..., torch.Tensor]
    feed_forward: Callable[..., torch.Tensor]
    cfg_step: Callable[..., tuple[torch.Tensor, torch.Tensor]]


def set_ops(model: nn.Module, ops: Ops) -> None:
    """Give every module of `model` that calls ops (it has an `ops` table) this one."""
    for m in model.modules():
        if isinstance(getattr(m, "ops", None), Ops):
            m.ops = ops


class Backend:
    """An op table and the model preparation that goes with it; the base prepares nothing but the ops."""

    name = "torch"

    def __init__(self, ops: Ops):
        self.ops = ops

    def prepare(self, model: nn.Module) -> nn.Module:
        set_ops(model, self.ops)
        return model

    def prepare_standalone(self, model: nn.Module) -> nn.Module:
        """Prepare a model that is not one of the pipeline's four (an upscaler model): the base as any model."""
        return self.prepare(model)

    def unprepare(self, model: nn.Module) -> nn.Module:
        from fastsd.backends.reference import OPS

        set_ops(model, OPS)
        return model

    def plain_weights(self, model: nn.Module) -> nn.Module:
        """Make `model`'s weights plain dense tensors that can be read and replaced (a LoRA merge), keeping
        their memory layout; prepare(model) afterwards takes the model back. The base: unprepare."""
        return self.unprepare(model)

    def replace_weight(self, module: nn.Module, weight: nn.Parameter) -> None:
        """Give `module` (one Conv2d / Linear) `weight` in place of its own, which is dropped, and prepare it."""
        self.plain_weights(module)
        module.weight = weight
        self.prepare(module)

    def prepare_replaced(self, module: nn.Module) -> None:
        """Prepare `module` (one Conv2d / Linear) after plain_weights, its weight replaced by a merge (a LoRA
        load) with one of the same shape. The base: prepare."""
        self.prepare(module)

    def replacing_weights(self) -> contextlib.AbstractContextManager:
        """Wraps a merge of many weights (a LoRA load; a backend may tidy up after it)."""
        return contextlib.nullcontext()

    def running(self, model: nn.Module) -> contextlib.AbstractContextManager:
        """Wraps each run of `model` (a backend may tidy up after it)."""
        return contextlib.nullcontext()

    def __repr__(self) -> str:
        return f"<backend {self.name}>"


@functools.cache
def package_import_error(package: str) -> str | None:
    """None when `package` imports, else why not (an optional backend's package: triton, openvino)."""
    try:
        importlib.import_module(package)
    except Exception as e:  # ImportError, or a broken install raising anything at import
        return f"{type(e).__name__}: {e}"
    return None


def check_name(name: str) -> str:
    if name not in NAMES:
        raise BackendError(f"unknown backend {name!r}; choose one of {', '.join(NAMES)}")
    return name


def resolve(name: str, device: torch.device, dtype: torch.dtype | None = None) -> str:
    """The backend `name` stands for on `device`: auto -> triton on CUDA (when triton imports); on a CPU
    openvino where it was measured faster for `dtype` on this CPU, else cpu; else torch."""
    name = check_name(name)
    if name != "auto":
        return name
    if device.type == "cuda":
        from fastsd.backends.triton import unavailable

        return "triton" if unavailable(device) is None else "torch"
    if device.type != "cpu":
        return "torch"
    from fastsd.backends.openvino import auto_picks_openvino

    return "openvino" if auto_picks_openvino(dtype) else "cpu"


def get(name: str, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> Backend:
    """The backend `name` ("auto" resolved for `device` and the models' `dtype`); BackendError when it
    can't run there."""
    device = torch.device(device)
    requested, name = name, resolve(name, device, dtype)
    if name == "torch":
        from fastsd.backends.reference import BACKEND

        return BACKEND
    if name == "cpu":
        if device.type != "cpu":
            raise BackendError(f"backend 'cpu' runs on a CPU, not on {device.type}")
        from fastsd.backends.cpu import BACKEND

        return BACKEND
    if name == "openvino":
        from fastsd.backends.openvino import BACKEND, unavailable

        why = unavailable(device)
        if why is not None:
            raise BackendError(f"backend 'openvino' was requested but {why}")
        return BACKEND
    from fastsd.backends.triton import AUTO_BACKEND, BACKEND, unavailable

    why = unavailable(device)
    if why is not None:
        raise BackendError(f"backend 'triton' was requested but {why}")
    return AUTO_BACKEND if requested == "auto" else BACKEND
