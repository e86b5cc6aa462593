"""The reference ops, plain PyTorch: what `--backend torch` runs and what every other backend and kernel is
tested against. Models hold this table (`OPS`) until a backend's prepare() gives them another.

cfg_step: guidance + sampler update, the contract every backend's cfg_step keeps:

  cfg_step(x, uncond, cond, scale, coeffs, old_denoised=None, noise=None) -> (x_next, denoised)
  denoised = uncond + (cond - uncond) * scale     (guidance; with uncond=None, denoised is cond itself)
  x_next   = a * x + b * denoised + c * old_denoised + d * noise,   coeffs = (a, b, c, d) host floats

x, uncond, cond, old_denoised, noise: same shape (uncond/cond are the halves of the batched denoiser output).
Terms with a zero coefficient are skipped (old_denoised / noise may then be None). x_next has x's dtype;
denoised the promoted dtype of x, uncond and cond (cond as given when there is no guidance).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fastsd.backends import Backend, Ops


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None,
              causal: bool = False) -> torch.Tensor:
    """q (B, H, Lq, D), k/v (B, H, Lk, D) -> (B, H, Lq, D); softmax(q k^T * scale) v."""
    return F.scaled_dot_product_attention(q, k, v, scale=scale, is_causal=causal)


def group_norm(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
               *, eps: float = 1e-5, silu: bool = False) -> torch.Tensor:
    """GroupNorm with statistics in fp32 (as LDM's GroupNorm32), optionally followed by SiLU; x (N, C, *)."""
    y = F.group_norm(x.float(), num_groups, None if weight is None else weight.float(),
                     None if bias is None else bias.float(), eps)
    if silu:
        y = F.silu(y)
    return y.to(x.dtype)


def feed_forward(block, x: torch.Tensor) -> torch.Tensor:
    """The transformer block's feed-forward with its LayerNorm and residual: x + ff(norm3(x))."""
    return x + block.ff.net(block.norm3(x))


def cfg_guidance(uncond: torch.Tensor, cond: torch.Tensor, scale: float) -> torch.Tensor:
    """uncond + (cond - uncond) * scale, in the promoted dtype of the two."""
    dt = torch.promote_types(uncond.dtype, cond.dtype)
    uncond, cond = uncond.to(dt), cond.to(dt)
    return uncond + (cond - uncond) * scale


def cfg_step(x: torch.Tensor, uncond: torch.Tensor | None, cond: torch.Tensor, scale: float | None,
             coeffs: tuple[float, float, float, float], old_denoised: torch.Tensor | None = None,
             noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    a, b, c, d = coeffs
    if uncond is None:
        denoised = cond
    else:
        if scale is None:
            raise ValueError("guidance (an uncond) needs a scale")
        dt = torch.promote_types(x.dtype, torch.promote_types(uncond.dtype, cond.dtype))
        denoised = cfg_guidance(uncond.to(dt), cond.to(dt), scale)
    out = denoised * b if a == 0 else torch.add(denoised * b, x, alpha=a)
    if c != 0:
        if old_denoised is None:
            raise ValueError("coeffs c != 0 needs old_denoised")
        out = out.add_(old_denoised, alpha=c)
    if d != 0:
        if noise is None:
            raise ValueError("coeffs d != 0 needs noise")
        out = out.add_(noise, alpha=d)
    return out.to(x.dtype), denoised


OPS = Ops(attention=attention, group_norm=group_norm, feed_forward=feed_forward, cfg_step=cfg_step)
BACKEND = Backend(OPS)
