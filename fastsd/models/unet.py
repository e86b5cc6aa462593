"""The SD1.x UNet (LDM openaimodel.UNetModel). Names mirror `model.diffusion_model.*` checkpoint keys:
input_blocks, middle_block, output_blocks, time_embed, out."""
from __future__ import annotations

import torch
from torch import nn

from fastsd.config import UNetConfig
from fastsd.models.layers import (Downsample, GroupNorm, ResBlock, SpatialTransformer, Upsample, guidance_embedding,
                                  timestep_embedding)


class TimestepSequential(nn.Sequential):
    """One input/output block: layers that take (x, emb), (x, context), (x, size) (an output block's
    upsampler: the size of the skip connection the next block concatenates) or x."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor,
                size: tuple[int, int] | None = None) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            elif isinstance(layer, Upsample):
                x = layer(x, size)
            else:
                x = layer(x)
        return x


class UNet(nn.Module):
    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        mc, groups, heads = cfg.model_channels, cfg.norm_groups, cfg.num_heads
        emb_dim = 4 * mc
        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        if cfg.time_cond_proj_dim:  # an LCM-distilled UNet: the guidance-scale embedding joins the timestep's
            self.time_embedding = nn.ModuleDict({"cond_proj": nn.Linear(cfg.time_cond_proj_dim, mc, bias=False)})

        def res(cin: int, cout: int) -> ResBlock:
            return ResBlock(cin, emb_dim, cout, groups)

        def attn(c: int) -> SpatialTransformer:
            return SpatialTransformer(c, heads, cfg.context_dim, groups)

        self.input_blocks = nn.ModuleList([TimestepSequential(nn.Conv2d(cfg.in_channels, mc, 3, padding=1))])
        skip_channels = [mc]  # channels of each input block's output, consumed in reverse by output_blocks
        ch = mc
        n_levels = len(cfg.channel_mult)
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers = [res(ch, mult * mc)]
                ch = mult * mc
                if cfg.attention_levels[level]:
                    layers.append(attn(ch))
                self.input_blocks.append(TimestepSequential(*layers))
                skip_channels.append(ch)
            if level != n_levels - 1:
                self.input_blocks.append(TimestepSequential(Downsample(ch)))
                skip_channels.append(ch)

        self.middle_block = TimestepSequential(res(ch, ch), attn(ch), res(ch, ch))

        self.output_blocks = nn.ModuleList()
        for level in reversed(range(n_levels)):
            mult = cfg.channel_mult[level]
            for i in range(cfg.num_res_blocks + 1):
                layers = [res(ch + skip_channels.pop(), mult * mc)]
                ch = mult * mc
                if cfg.attention_levels[level]:
                    layers.append(attn(ch))
                if level != 0 and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                self.output_blocks.append(TimestepSequential(*layers))

        self.out = nn.Sequential(GroupNorm(groups, ch, silu=True), nn.Identity(),
                                 nn.Conv2d(ch, cfg.out_channels, 3, padding=1))

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                guidance: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, in_channels, h, w) latents; t (B,) or scalar timesteps (may be fractional);
        context (B, 77*k, context_dim) -> eps prediction (B, out_channels, h, w). `guidance` (B,) or scalar: an
        LCM-distilled UNet's guidance w (diffusers' LatentConsistencyModelPipeline: guidance scale - 1), embedded
        (`guidance_embedding`) and projected into the timestep embedding; None adds nothing (as diffusers)."""
        dtype = self.time_embed[0].weight.dtype
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(x.shape[0])
        temb = timestep_embedding(t, self.cfg.model_channels).to(dtype)
        if guidance is not None and self.cfg.time_cond_proj_dim:
            w = torch.as_tensor(guidance, device=x.device).reshape(-1).expand(x.shape[0])
            g = guidance_embedding(w, self.cfg.time_cond_proj_dim).to(dtype)
            temb = temb + self.time_embedding["cond_proj"](g)
        emb = self.time_embed(temb)  # (B, 4*mc)
        x, context = x.to(dtype), context.to(dtype)
        hs = []
        for block in self.input_blocks:
            x = block(x, emb, context)
            hs.append(x)
        x = self.middle_block(x, emb, context)
        for block in self.output_blocks:
            # a side that halves to an odd size on the way down: its upsampler goes back to the size of the skip
            # connection the next block takes (diffusers' upsample_size, so widths of any multiple of 8 px run)
            x = torch.cat([x, hs.pop()], dim=1)
            x = block(x, emb, context, hs[-1].shape[-2:] if hs else None)
        return self.out(x)
