"""fastsd: Stable Diffusion 1.x from scratch in PyTorch, with Triton kernels.

The names below are imported on first use, so a command line can parse its arguments (and answer --help)
before torch is imported.
"""
from __future__ import annotations

import importlib

_EXPORTS = {"load_pipeline": "fastsd.load", "Pipeline": "fastsd.pipeline", "Interrupted": "fastsd.pipeline",
            "GenerationSettings": "fastsd.settings", "BackendError": "fastsd.backends",
            "CheckpointError": "fastsd.tensorfile"}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'fastsd' has no attribute {name!r}")
