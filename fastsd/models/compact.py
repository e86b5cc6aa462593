"""Real-ESRGAN's SRVGGNetCompact (realesr-general-x4v3, realesr-general-wdn-x4v3, realesr-animevideov3): a small
upscaler, a fraction of RRDBNet's work per pixel.

Names mirror the files: `body` is an nn.Sequential of conv (in -> features), PReLU, `convs` times (conv, PReLU),
and a last conv to out_channels * scale**2 channels (keys `body.0.weight`, `body.1.weight` (the PReLU's
per-channel slopes), ...). Its output is pixel-shuffled to scale x the size and added to the input upsampled
(nearest). Images in [0, 1] at the model's boundary.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastsd.config import CompactConfig


class SRVGGNetCompact(nn.Module):
    def __init__(self, cfg: CompactConfig = CompactConfig()):
        super().__init__()
        self.cfg = cfg
        c = cfg.features
        layers: list[nn.Module] = [nn.Conv2d(cfg.in_channels, c, 3, padding=1), nn.PReLU(c)]
        for _ in range(cfg.convs):
            layers += [nn.Conv2d(c, c, 3, padding=1), nn.PReLU(c)]
        layers.append(nn.Conv2d(c, cfg.out_channels * cfg.scale ** 2, 3, padding=1))
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in, H, W) in [0, 1] -> (B, out, H * scale, W * scale)."""
        out = F.pixel_shuffle(self.body(x), self.cfg.scale)
        return out + F.interpolate(x, scale_factor=self.cfg.scale, mode="nearest")
