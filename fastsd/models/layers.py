"""Building blocks shared by the UNet and the VAE. Attribute names mirror the LDM checkpoint keys
(ldm/modules/diffusionmodules/openaimodel.py, ldm/modules/attention.py), so loading is near-identity.
Modules whose work a backend can swap (attention, GroupNorm, the feed-forward) call it through their `ops`
table: the reference ops until a backend's prepare() hands them its own."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fastsd.backends.reference import OPS


class GroupNorm(nn.GroupNorm):
    """GroupNorm through the ops table (fp32 statistics, as LDM's GroupNorm32), optionally fused with SiLU."""

    ops = OPS

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, silu: bool = False):
        super().__init__(num_groups, num_channels, eps)
        self.silu = silu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.group_norm(x, self.num_groups, self.weight, self.bias, eps=self.eps, silu=self.silu)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding, cos first (LDM; diffusers' flip_sin_to_cos=True, freq_shift=0). t: (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def guidance_embedding(w: torch.Tensor, dim: int) -> torch.Tensor:
    """An LCM-distilled UNet's embedding of its guidance w (B,) -> (B, dim): sinusoids of 1000 w, sin first, the
    frequencies 10000^(-i / (dim/2 - 1)) (diffusers' get_guidance_scale_embedding; an odd dim gets a zero column)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) / (half - 1) * torch.arange(half, dtype=torch.float32, device=w.device))
    args = (w.float() * 1000.0)[:, None] * freqs[None]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)
    return torch.nn.functional.pad(emb, (0, dim % 2))


class ResBlock(nn.Module):
    """GN-SiLU-conv, + time embedding, GN-SiLU-conv, + skip. Keys: in_layers.{0,2}, emb_layers.1,
    out_layers.{0,3}, skip_connection (UNet). The VAE variant (no embedding) uses ResnetBlock below."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int, groups: int = 32):
        super().__init__()
        self.in_layers = nn.Sequential(GroupNorm(groups, channels, silu=True), nn.Identity(),
                                       nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(GroupNorm(groups, out_channels, silu=True), nn.Identity(), nn.Identity(),
                                        nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip_connection = (nn.Identity() if out_channels == channels
                                else nn.Conv2d(channels, out_channels, 1))

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        h = h + self.emb_layers(emb)[:, :, None, None].to(h.dtype)
        return self.skip_connection(x) + self.out_layers(h)


class CrossAttention(nn.Module):
    """Multi-head attention; self-attention when context is None. Keys: to_q, to_k, to_v, to_out.0."""

    ops = OPS

    def __init__(self, query_dim: int, context_dim: int | None, heads: int, dim_head: int):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        b, lq, _ = x.shape
        # (B, L, H*Dh) -> (B, H, L, Dh) as strided views; the attention op takes any strides
        q = self.to_q(x).view(b, lq, self.heads, -1).transpose(1, 2)
        k = self.to_k(context).view(b, context.shape[1], self.heads, -1).transpose(1, 2)
        v = self.to_v(context).view(b, context.shape[1], self.heads, -1).transpose(1, 2)
        out = self.ops.attention(q, k, v)  # (B, H, Lq, Dh)
        return self.to_out(out.transpose(1, 2).reshape(b, lq, -1))


class GEGLU(nn.Module):
    """Linear to 2*inner, then x * GELU(gate) with the exact (erf) GELU. Key: proj."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class BasicTransformerBlock(nn.Module):
    """Self-attention, cross-attention, GEGLU feed-forward (4x), each pre-LayerNorm with a residual."""

    ops = OPS

    def __init__(self, dim: int, heads: int, context_dim: int):
        super().__init__()
        self.attn1 = CrossAttention(dim, None, heads, dim // heads)
        self.ff = nn.Module()
        self.ff.net = nn.Sequential(GEGLU(dim, 4 * dim), nn.Identity(), nn.Linear(4 * dim, dim))  # keys ff.net.{0,2}
        self.attn2 = CrossAttention(dim, context_dim, heads, dim // heads)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return self.ops.feed_forward(self, x)  # x + ff.net(norm3(x))


class SpatialTransformer(nn.Module):
    """GroupNorm, 1x1 conv in, transformer block(s) over the H*W tokens, 1x1 conv out, residual (SD1.x)."""

    def __init__(self, channels: int, heads: int, context_dim: int, groups: int = 32):
        super().__init__()
        self.norm = GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = nn.Conv2d(channels, channels, 1)
        self.transformer_blocks = nn.ModuleList([BasicTransformerBlock(channels, heads, context_dim)])
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.proj_in(self.norm(x))
        y = y.flatten(2).transpose(1, 2)  # (B, H*W, C)
        for block in self.transformer_blocks:
            y = block(y, context)
        y = y.transpose(1, 2).reshape(b, c, h, w)
        return x + self.proj_out(y)


class Downsample(nn.Module):
    """3x3 conv with stride 2. UNet key: op; the VAE's variant pads asymmetrically (see vae.py)."""

    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Nearest 2x (or nearest to `size`, where the skip connection it meets is odd-sized), then 3x3 conv.
    Key: conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        if size is None or tuple(size) == (2 * x.shape[-2], 2 * x.shape[-1]):
            return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return self.conv(F.interpolate(x, size=tuple(size), mode="nearest"))
