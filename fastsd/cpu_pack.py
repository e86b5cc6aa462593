"""Weights prepacked in oneDNN's blocked layout, once, for the CPU path under backend auto.

`F.conv2d` on a CPU reorders the weight into oneDNN's blocked layout on every call, and `F.linear` runs
MKL's GEMM (slow in fp32 on this AMD CPU). Measured on the 2-core EPYC (`python -m benchmarks.cpu_paths`):
3x3 conv 2560->1280 on 8x8 latents, batch 2: bf16 24.2 ms plain, 9.6 ms prepacked, fp32 47.4 -> 19.0 ms
(320 channels at 64x64: unchanged, 14.2 / 14.1 ms); linear 8192x320 -> 320: bf16 2.32 -> 1.72 ms, fp32
7.79 -> 3.51 ms. `pack_weights` swaps in place (3x3 convolutions and linears; not 1x1 convolutions, see
`_packable`): each Conv2d / Linear keeps its name, its `weight` becomes the
packed (mkldnn) tensor - no second copy - and `state_dict()` gives the plain weight back. Outputs match
F.conv2d / F.linear to rounding (the same oneDNN convolution; oneDNN's GEMM instead of MKL's for linears):
tests/test_cpu_paths.py holds packed models to the unpacked ones.
"""
from __future__ import annotations

import ctypes

import torch
from torch import nn

PACK_DTYPES = (torch.float32, torch.bfloat16)
EXAMPLE_ROWS = 2048  # the batch (tokens) / spatial size oneDNN picks a blocked format for; any size runs


class PackedConv2d(nn.Conv2d):
    """A Conv2d whose `weight` buffer is an mkldnn tensor; made by `pack_weights`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._convolution_pointwise(
            x, self.weight, self.bias, list(self.padding), list(self.stride), list(self.dilation), self.groups,
            "none", [], "")


class PackedLinear(nn.Linear):
    """A Linear whose `weight` buffer is an mkldnn tensor; made by `pack_weights`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")


def _dense_state(module, state_dict, prefix, local_metadata) -> None:
    key = prefix + "weight"
    if key in state_dict and state_dict[key].is_mkldnn:
        state_dict[key] = state_dict[key].to_dense()


def _packable(m: nn.Module) -> bool:
    if type(m) not in (nn.Conv2d, nn.Linear):
        return False
    if type(m) is nn.Conv2d and (m.padding_mode != "zeros" or isinstance(m.padding, str)
                                 or m.kernel_size == (1, 1)):
        return False  # 1x1: oneDNN's packed format depends on the input size (torch profiler, bf16 UNet
        # step at 32x32 latents: 2560->1280 on 4x4, packed for 45x45, 68 ms a call instead of 0.9 ms)
    return m.weight.device.type == "cpu" and m.weight.dtype in PACK_DTYPES and not m.weight.requires_grad


def _packed(m: nn.Module, w: torch.Tensor) -> torch.Tensor:
    if type(m) is nn.Linear:
        return torch.ops.mkldnn._reorder_linear_weight(w, EXAMPLE_ROWS)
    side = int(EXAMPLE_ROWS ** 0.5)
    return torch.ops.mkldnn._reorder_convolution_weight(
        w, list(m.padding), list(m.stride), list(m.dilation), m.groups, [2, m.in_channels, side, side])


@torch.no_grad()
def pack_weights(model: nn.Module) -> int:
    """Prepack every plain CPU Conv2d and Linear of `model` (fp32/bf16, frozen) in place; returns how
    many were packed (0 when this torch has no oneDNN)."""
    if not torch.backends.mkldnn.is_available():
        return 0
    n = 0
    for m in list(model.modules()):
        if not _packable(m):
            continue
        weight = _packed(m, m.weight.detach())
        del m.weight
        m.register_buffer("weight", weight)
        m.__class__ = PackedConv2d if type(m) is nn.Conv2d else PackedLinear
        m._register_state_dict_hook(_dense_state)
        n += 1
    release_freed_memory()
    return n


def release_freed_memory() -> None:
    """Hand the heap memory of the replaced dense weights back to the OS (glibc's malloc_trim; a no-op
    elsewhere). glibc keeps freed chunks below its mmap threshold in the heap: without this, RSS after
    loading random:sd15 in bf16 stayed 0.32 GiB above the unpacked model's (/proc/self/status VmRSS)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
