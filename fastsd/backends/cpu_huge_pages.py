"""Tensors on transparent huge pages, for the cpu backend's large long-lived buffers (Winograd-transformed weights):
a private anonymous mapping of their own, 2 MiB aligned and advised MADV_HUGEPAGE before anything touches it, freed
with the tensor. On 4 KiB pages the same layer ran up to 2x slower depending on where its memory landed, and the
tuner, timing it at its first call, kept slower choices (docs/cpu-path.md, "Huge pages"). Only these buffers: torch's
own switch for all its large tensors (THP_MEM_ALLOC_ENABLE=1) made a one-image CLI run seconds slower on a VM, whose
fresh huge pages the host faults in at load. Off where cpuinfo.huge_pages() says so (FASTSD_CPU_HUGE_PAGES=0, a
kernel without THP); then, and for small buffers, torch.empty.
"""
from __future__ import annotations

import math
import mmap

import torch

from fastsd import cpuinfo

HUGE_PAGE = 2 << 20
MIN_BYTES = HUGE_PAGE  # smaller buffers: torch.empty


def empty(shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """An uninitialised contiguous tensor, on huge pages where they are available and it fills at least one."""
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes < MIN_BYTES or not cpuinfo.huge_pages():
        return torch.empty(shape, dtype=dtype)
    try:
        region = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        region.madvise(mmap.MADV_HUGEPAGE)
    except (OSError, ValueError):  # no memory for the mapping, or the advice refused: torch's allocator decides
        return torch.empty(shape, dtype=dtype)
    raw = torch.frombuffer(region, dtype=torch.uint8)  # holds the mapping until the last view of it goes
    start = -raw.data_ptr() % HUGE_PAGE  # the pages before it are never touched, so never resident
    return raw[start:start + nbytes].view(dtype).view(shape)
