"""The ops the models call where a Triton kernel can stand in: each has its torch reference here and
dispatches through `fastsd.backend` to the kernel in `kernels/`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fastsd import backend

KERNEL_MAX_HEAD_DIM = 256  # kernels.attention keeps one (BLOCK_M, D) accumulator in registers


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None,
                        causal: bool = False) -> torch.Tensor:
    """q (B, H, Lq, D), k/v (B, H, Lk, D) -> (B, H, Lq, D); softmax(q k^T * scale) v."""
    return F.scaled_dot_product_attention(q, k, v, scale=scale, is_causal=causal)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None,
              causal: bool = False) -> torch.Tensor:
    """Multi-head attention. The Triton kernel is non-causal with head dim <= 256; CLIP's causal
    attention and the VAE's single 512-wide head always take the reference path."""
    supported = not causal and q.shape[-1] <= KERNEL_MAX_HEAD_DIM
    if backend.wants_triton(q.device, supported=supported):
        import kernels

        return kernels.attention(q, k, v, scale=scale)
    return attention_reference(q, k, v, scale=scale, causal=causal)


def group_norm_reference(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
                         *, eps: float = 1e-5, silu: bool = False) -> torch.Tensor:
    """GroupNorm with statistics in fp32 (as LDM's GroupNorm32), optionally followed by SiLU; x (N, C, *)."""
    y = F.group_norm(x.float(), num_groups, None if weight is None else weight.float(),
                     None if bias is None else bias.float(), eps)
    if silu:
        y = F.silu(y)
    return y.to(x.dtype)


def group_norm(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
               *, eps: float = 1e-5, silu: bool = False) -> torch.Tensor:
    if backend.wants_triton(x.device, supported=x.dim() == 4):
        import kernels

        return kernels.group_norm(x, num_groups, weight, bias, eps=eps, silu=silu)
    return group_norm_reference(x, num_groups, weight, bias, eps=eps, silu=silu)
