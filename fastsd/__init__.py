"""fastsd: Stable Diffusion 1.x from scratch in PyTorch, with Triton kernels."""
from fastsd.backend import BackendError, set_backend
from fastsd.pipeline import Pipeline, load_pipeline
from fastsd.tensorfile import CheckpointError

__all__ = ["load_pipeline", "Pipeline", "set_backend", "BackendError", "CheckpointError"]
