"""fastsd: Stable Diffusion 1.x from scratch in PyTorch, with Triton kernels.

The names below are imported on first use, so a command line can parse its arguments (and answer --help)
before torch is imported.
"""
from __future__ import annotations

import importlib
import os
import sys

# Transparent huge pages for torch's tensors of 2 MiB and up (weights, packed and Winograd-transformed weights,
# activations): torch reads THP_MEM_ALLOC_ENABLE once, at its first allocation, so it is set here, before fastsd
# imports torch (a value already set, e.g. 0 to turn it off, is kept; a process that imported torch first runs
# without). On 4 KiB pages the same layer ran up to 2x slower depending on where its memory landed, so the CPU
# tuner's choices came out by chance (docs/cpu-path.md, "Huge pages").
if "torch" not in sys.modules:
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

_EXPORTS = {"load_pipeline": "fastsd.load", "Pipeline": "fastsd.pipeline", "Interrupted": "fastsd.pipeline",
            "GenerationSettings": "fastsd.settings", "BackendError": "fastsd.backends",
            "CheckpointError": "fastsd.tensorfile"}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'fastsd' has no attribute {name!r}")
