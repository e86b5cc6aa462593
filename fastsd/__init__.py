"""fastsd: Stable Diffusion 1.x from scratch in PyTorch, with Triton kernels."""
from fastsd.backend import set_backend

__all__ = ["set_backend"]
